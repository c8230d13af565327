"""(micro-batch 8 x accumulation 1) and (micro-batch 2 x accumulation 4) train the same.

The real CLI (`colld train`, one process, DeepSpeed ZeRO-2) on the same 8 utterances per step:
the losses and the gradient norms of every step must agree. They only do if the objectives'
sums are normalised over the scored frames of the whole step (micro-batches hold different
numbers of masked frames) and if masks and negatives do not depend on the batch split.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml"
STEPS = 3


def no_dropout(teacher_dir: str) -> None:
    """The student copies the teacher's config: zero every dropout and the layer drop, the
    only randomness that still depends on the micro-batch split."""
    path = Path(teacher_dir) / "config.json"
    config = json.loads(path.read_text())
    for key in config:
        if key.endswith("dropout") or key == "layerdrop":
            config[key] = 0.0
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("accumulation")
    # xlsr-style front end (layer norm + attention mask): padding does not change the frames
    teacher = make_tiny_teacher("xlsr", str(root / "teacher"), seed=0, num_layers=4)
    no_dropout(teacher)
    write_audio_shards(generate_utterances(16, seed=1), str(root / "shards"), max_count=16,
                       progress=False)

    def train(objective: str, batch_size: int, accumulation: int) -> list[dict]:
        out_dir = root / f"{objective}_{batch_size}x{accumulation}"
        settings = {"teacher.path": teacher, "data.train_shards": str(root / "shards"),
                    "run.out_dir": str(out_dir), "objective.name": objective,
                    "data.batch_size": batch_size,
                    "optim.gradient_accumulation_steps": accumulation,
                    "data.max_seconds": 1.5, "data.num_workers": 0,
                    "optim.max_steps": STEPS, "optim.warmup_steps": 1, "optim.lr": 1e-3,
                    "run.log_every": 1, "run.save_every": STEPS}
        command = [sys.executable, "-m", "colld_ds.cli", "train", "--config", str(CONFIG)]
        command += [part for key, value in settings.items() for part in (f"--{key}", str(value))]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]

    return train


@pytest.mark.parametrize("objective", ["colld", "l2l"])
def test_accumulation_matches_one_large_micro_batch(runs, objective):
    large, accumulated = runs(objective, 8, 1), runs(objective, 2, 4)
    assert [row["step"] for row in large] == [row["step"] for row in accumulated] == [1, 2, 3]
    for one, other in zip(large, accumulated):
        for key in [k for k in one if k.startswith(("loss/", "acc/", "cos/"))] + ["grad_norm"]:
            assert other[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (one["step"], key)
    # training moved: the comparison is not between two runs that did nothing
    assert large[-1]["loss/total"] != pytest.approx(large[0]["loss/total"], rel=1e-3)
