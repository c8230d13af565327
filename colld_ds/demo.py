"""The embedded default run (README command one).

Until the real-teacher demo lands: generated audio -> shards, a tiny random wav2vec 2.0 teacher
saved with ``save_pretrained``, CoLLD distillation of a 2-layer student on CPU ranks through
``launch.sh``, and a summary of the loss and contrastive accuracy. Each stage is skipped when its
output already exists, so a re-run resumes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

from colld_ds.checkpoint import checkpoint_tag, complete_checkpoints

REPO = Path(__file__).resolve().parent.parent


def _stage(name: str, done: bool) -> bool:
    print(f"[demo] {name}: {'exists, skipped' if done else 'running'}", flush=True)
    return not done


def run_demo(out_dir: str, num_utterances: int, max_steps: int, ranks: int,
             overrides: dict | None = None) -> Path:
    from data_prep.generated_audio import generate_utterances
    from data_prep.shards import write_audio_shards
    from data_prep.tiny_teacher import make_tiny_teacher

    out = Path(out_dir).resolve()
    shards_dir, teacher_dir, run_dir = out / "shards", out / "teacher", out / "run"
    num_shards = 2 * ranks
    if _stage("generated audio shards", len(list(shards_dir.glob("train-*.tar"))) >= num_shards):
        write_audio_shards(generate_utterances(num_utterances, seed=0),
                           shards_dir, prefix="train", max_count=-(-num_utterances // num_shards))
    if _stage("tiny wav2vec2 teacher", (teacher_dir / "config.json").is_file()):
        make_tiny_teacher("wav2vec2", str(teacher_dir), seed=0, num_layers=4, hidden_size=64)

    config = yaml.safe_load((REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml").read_text())
    config["teacher"]["path"] = str(teacher_dir)
    config["data"]["train_shards"] = str(shards_dir)
    config["optim"]["max_steps"] = max_steps
    config["run"]["out_dir"] = str(run_dir)
    config["run"]["resume"] = "auto"
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    final = run_dir / "checkpoints" / checkpoint_tag(max_steps)
    if _stage(f"CoLLD distillation on {ranks} CPU ranks", final in complete_checkpoints(final.parent)):
        flags = [f"--{key} {value}" for key, value in (overrides or {}).items()]
        command = [str(REPO / "launch.sh"), "--config", str(config_path)]
        command += [part for flag in flags for part in flag.split(" ", 1)]
        env = dict(os.environ, COLLD_CPU_RANKS=str(ranks), COLLD_PYTHON=sys.executable)
        subprocess.run(command, check=True, env=env, cwd=REPO)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    negatives = config["objective"]["num_negatives"]
    chance = {"loss": math.log(negatives + 1), "acc": 1 / (negatives + 1)}
    print("\n[demo] CoLLD distillation summary (averaged over ranks; chance = a student that "
          "knows nothing)")
    print(f"{'metric':<24}{'step ' + str(first['step']):>12}{'step ' + str(last['step']):>12}"
          f"{'chance':>12}")
    for key in sorted(k for k in last if k.startswith(("loss/", "acc/"))):
        print(f"{key:<24}{first[key]:>12.4f}{last[key]:>12.4f}"
              f"{chance[key.split('/')[0]]:>12.4f}")
    print(f"\n[demo] checkpoint:      {final}")
    print(f"[demo] TensorBoard:     tensorboard --logdir {run_dir / 'tb'}")
    print(f"[demo] metrics (JSONL): {run_dir / 'metrics.jsonl'}")
    print(f"[demo] resolved config: {run_dir / 'config.yaml'}")
    return final
