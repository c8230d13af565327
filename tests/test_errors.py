"""User errors on the command line: one line naming the file, field or flag and the fix, exit
status 1, no traceback (the traceback only with --verbose or COLLD_VERBOSE=1), on `colld`,
`colld prep`, `python -m colld_ds.data_prep.cli` and through launch.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from colld_ds.data_prep.cache import cache_teacher
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """`teacher/` (4 layers), `noweights/` (its config.json alone) and `shards/` (2 shards)."""
    root = tmp_path_factory.mktemp("errors")
    make_tiny_teacher("wav2vec2", str(root / "teacher"), seed=0, num_layers=4, hidden_size=32)
    (root / "noweights").mkdir()
    shutil.copy(root / "teacher" / "config.json", root / "noweights")
    write_audio_shards(generate_utterances(4, seed=1), str(root / "shards"), max_count=2,
                       progress=False)
    return root


def run(cwd: Path, *args: str, module: str = "colld_ds.cli", **env: str
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "COLLD_VERBOSE": "", **env})


def one_error_line(done: subprocess.CompletedProcess, prog: str = "colld") -> str:
    """The one `<prog>: error: ...` line of a failed command with no traceback."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0] == done.stderr.strip().splitlines()[-1]
    return lines[0]


def test_teacher_without_weights_names_the_directory_and_the_files(assets):
    line = one_error_line(run(assets, "prep", "cache_teacher", "shards", "noweights", "all", "c"))
    assert line.startswith("colld: error: teacher path 'noweights' has a config.json but no "
                           "weights: expected one of model.safetensors"), line
    assert "pytorch_model.bin" in line


def test_cache_teacher_layer_error_names_the_layers_flag(assets):
    line = one_error_line(run(assets, "prep", "cache_teacher", "shards", "teacher", "9", "c"))
    assert line.startswith("colld: error: --layers 9: no teacher layer [9]"), line
    assert "layers 1..4" in line and "layer_map" not in line
    line = one_error_line(run(assets, "cache_teacher", "shards", "teacher", "two", "c",
                              module="colld_ds.data_prep.cli"), prog="colld prep")
    assert "--layers 'two' is not a list of layer numbers" in line, line


def test_stale_cache_says_what_to_do_instead_of_running_the_same_command(assets):
    cache_teacher(str(assets / "shards"), str(assets / "teacher"), 2, str(assets / "stale"),
                  progress=False)
    done = run(assets, "prep", "cache_teacher", "shards", "teacher", "3", "stale")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    message = done.stderr[done.stderr.index("colld: error: existing cache shard "):]
    assert "was cached from a different teacher" in message
    assert "write this cache to another out_dir, or delete the cache shards in stale" in message
    assert "re-run cache-teacher" not in message


def test_no_shards_matched_gives_the_pattern_and_how_to_check(assets):
    line = one_error_line(run(assets, "prep", "inspect", "data/train-*.tar"))
    expected = "colld: error: no shards matched data/train-*.tar: give a directory"
    assert line.startswith(expected), line
    assert f"relative to {assets}" in line and "check it with `ls data/train-*.tar`" in line


def test_train_user_error_is_one_line_and_verbose_shows_the_traceback(assets):
    args = ["train", "--config", str(CONFIG), "--teacher.path", "missing-teacher",
            "--data.train_shards", "shards", "--run.out_dir", "run"]
    line = one_error_line(run(assets, *args))
    assert "teacher path 'missing-teacher' is not a local Hugging Face model directory" in line
    for done in (run(assets, *args, "--verbose"), run(assets, *args, COLLD_VERBOSE="1")):
        assert done.returncode == 1 and "Traceback" in done.stderr, done.stderr[-3000:]
        assert "TeacherFilesError: teacher path 'missing-teacher'" in done.stderr


def test_build_lock_left_by_a_killed_build_is_an_error_not_a_hang(assets, tmp_path):
    """A killed start-up leaves DeepSpeed's op build lock; torch alone waits on it forever."""
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    os.utime(lock, (0, 0))
    done = run(assets, "train", "--config", str(CONFIG), "--teacher.path", "teacher",
               "--data.train_shards", "shards", "--run.out_dir", "run",
               TORCH_EXTENSIONS_DIR=str(tmp_path))
    line = one_error_line(done)
    assert line.startswith(f"colld: error: {lock}: a build lock "), line
    assert f"delete it (rm {lock})" in line and lock.exists()


@pytest.mark.slow
def test_launch_sh_user_error_is_one_line_per_rank_without_traceback(assets):
    done = subprocess.run(
        [str(REPO / "launch.sh"), "--config", str(CONFIG), "--teacher.path", "teacher",
         "--data.train_shards", "no-such-dir", "--run.out_dir", "run"],
        cwd=assets, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, COLLD_CPU_RANKS="2", COLLD_PYTHON=sys.executable, COLLD_VERBOSE=""))
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("colld: ")]
    assert len(lines) == 2 and len(set(lines)) == 1, output[-3000:]   # one per rank
    assert lines[0].startswith("colld: error: no shards matched no-such-dir"), lines


def test_launch_sh_missing_hostfile_is_an_error_not_a_run_on_this_machine(tmp_path):
    done = subprocess.run([str(REPO / "launch.sh"), "--hostfile", "hosts", "--config", str(CONFIG)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, COLLD_PYTHON=sys.executable))
    line = one_error_line(done)
    assert line.startswith("colld: error: --hostfile 'hosts' is not a file"), line
