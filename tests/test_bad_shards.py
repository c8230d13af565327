"""A shard damaged while training reads it: `data.on_bad_shard` stop (default: one error naming
it) or skip (its remaining samples left out, counted, logged and summed in the run summary; ranks
still take equal steps, and resume stays exact). The shard is damaged in place (same size), so it
still passes the size check against its index and fails only when it is read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from colld_ds.data import AudioBatchStream, DamageReport
from colld_ds.errors import DataError
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from helpers import keys_of, take

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml"
DAMAGED = "train-000002.tar"


def damage(path: Path, sample: int) -> list[str]:
    """Overwrite the tar header of `path`'s `sample`-th sample (2 members each) with garbage of
    the same size; the keys of the samples from there on (those a reader loses)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    with open(path, "r+b") as file:
        file.seek(members[2 * sample].offset)
        file.write(b"\xff" * 512)
    return sorted({m.name.split(".")[0] for m in members[2 * sample:]})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    """4 shards x 6 utterances with their index; `DAMAGED` damaged from its 3rd sample on."""
    root = tmp_path_factory.mktemp("bad_shards")
    write_audio_shards(generate_utterances(24, seed=5, min_seconds=0.3, max_seconds=1.0),
                       str(root), max_count=6, progress=False)
    return root, damage(root / DAMAGED, 2)


def ranks(directory: Path, policy: str, **kw) -> list[AudioBatchStream]:
    return [AudioBatchStream(str(directory), batch_size=2, max_seconds=1.0, seed=2, rank=rank,
                             world_size=2, shuffle_buffer=4, on_bad_shard=policy, **kw)
            for rank in range(2)]


def test_stop_is_one_error_naming_the_shard(shards):
    directory, _ = shards
    errors = []
    for stream in ranks(directory, "stop"):
        try:
            take(stream, stream.epoch_length(0))
        except DataError as error:
            errors.append(str(error))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"shard {directory / DAMAGED} holds the end of the shard at "
                                "sample 2 where its index or header scan said "), errors
    assert "it is damaged (restore it, or set data.on_bad_shard skip)" in errors[0]


def test_skip_keeps_ranks_in_step_and_reports_the_skipped_samples(shards):
    directory, lost = shards
    for stream in ranks(directory, "skip", num_workers=1):
        report = DamageReport(stream.rank)
        batches = list(zip(range(stream.epoch_length(0) + stream.epoch_length(1)),
                           report.watch(iter(stream))))
        assert len(batches) == stream.epoch_length(0) + stream.epoch_length(1) == 12
        assert stream.state_dict() == {"epoch": 2, "batches_in_epoch": 0}
        keys = keys_of([batch for _, batch in batches])
        assert not set(keys) & set(lost)
        if report.shards:      # the rank that read it, once per epoch
            assert ([(d.url, d.skipped) for d in report.shards]
                    == [(str(directory / DAMAGED), 4)] * 2)
            assert report.summary() == (f"[colld] data.on_bad_shard skip: 8 samples of 1 damaged "
                                        f"shard(s) were skipped: {directory / DAMAGED} (8)")
        else:
            assert report.summary() is None


def test_skip_resumes_exactly(shards):
    directory, _ = shards
    for rank in range(2):
        reference = take(ranks(directory, "skip")[rank], 14)
        first = ranks(directory, "skip")[rank]
        head = take(first, 5)
        resumed = ranks(directory, "skip")[rank]
        resumed.load_state_dict(first.state_dict())
        rest = take(resumed, 9)
        assert keys_of(head + rest) == keys_of(reference)
        assert all(torch.equal(a.wave, b.wave) for a, b in zip(head + rest, reference))


# --- 2 CPU ranks through launch.sh: the shard is damaged between two phases of a run ----------


def launch(root: Path, out_dir: Path, **extra) -> subprocess.CompletedProcess:
    values = {"teacher.path": str(root / "teacher"), "data.train_shards": str(root / "shards"),
              "run.out_dir": str(out_dir), "optim.max_steps": 12, "run.save_every": 6,
              "run.log_every": 1, "optim.warmup_steps": 2, "data.batch_size": 2, **extra}
    command = [str(REPO / "launch.sh"), "--config", str(CONFIG)]
    for key, value in values.items():
        command += [f"--{key}", str(value)]
    env = dict(os.environ, COLLD_CPU_RANKS="2", COLLD_PYTHON=sys.executable, COLLD_VERBOSE="")
    return subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_shard_damaged_between_phases_of_a_two_rank_run(tmp_path):
    make_tiny_teacher("wav2vec2", str(tmp_path / "teacher"), seed=0, num_layers=4, hidden_size=32)
    write_audio_shards(generate_utterances(24, seed=5, min_seconds=0.5, max_seconds=2.0),
                       str(tmp_path / "shards"), max_count=6, progress=False)
    first = launch(tmp_path, tmp_path / "run", **{"run.stop_at_step": 6})
    assert first.returncode == 0, first.stderr[-3000:]
    damage(tmp_path / "shards" / DAMAGED, 1)
    shutil.copytree(tmp_path / "run", tmp_path / "run-skip")

    stopped = launch(tmp_path, tmp_path / "run", **{"run.resume": "auto"})
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert f"colld: error: shard {tmp_path / 'shards' / DAMAGED} holds the end" in output

    skipped = launch(tmp_path, tmp_path / "run-skip",
                     **{"run.resume": "auto", "data.on_bad_shard": "skip"})
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert (f"[colld] data.on_bad_shard skip: 5 samples of 1 damaged shard(s) were skipped: "
            f"{tmp_path / 'shards' / DAMAGED} (5)") in skipped.stderr, skipped.stderr[-3000:]
    assert "remaining samples of damaged shard" in skipped.stderr
    metrics = (tmp_path / "run-skip" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 13))
