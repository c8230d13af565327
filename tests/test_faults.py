"""Checkpoint fault tolerance: half-written, corrupt and unwritable checkpoints, and kill -9.

The first tests run in this process with a fake engine (no DeepSpeed, no process group:
``save_checkpoint`` and ``load_checkpoint`` skip their collectives when torch.distributed is not
initialised), or in two forked gloo processes for the cross-rank agreement. The last ones run the
real CLI on 2 CPU ranks (``launch`` as in test_train.py): one rank is killed with SIGKILL after two
checkpoints are complete, and the relaunched job must compute what an uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import colld_ds.checkpoint as checkpoint
import colld_ds.train as train_module
import colld_ds.data_prep.shards as shards
from colld_ds.checkpoint import (COMPLETE_MARKER, CheckpointFallbackWarning, CheckpointLoadError,
                                 CheckpointWriteError, complete_checkpoints, load_checkpoint,
                                 resume_candidates)
from colld_ds.formats import shard_keys
from colld_ds.monitor import keep_rows_up_to
from colld_ds.data_prep.cache import cache_teacher
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import ShardWriteError, write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from helpers import (CONFIG, MODEL_STATES, OPTIM_STATES, REPO, FakeEngine, kill_group, overrides,
                     save)


def latest(resume, directory):
    """The checkpoint a run resumes from first (what train() tries first)."""
    candidates = resume_candidates(resume, directory)
    return candidates[0] if candidates else None


def load_checkpoint_auto(engine, directory):
    """What train() does with --run.resume auto."""
    return load_checkpoint(engine, resume_candidates("auto", directory))


# ---------------------------------------------------------------- half-written checkpoints

def test_half_written_checkpoints_are_never_the_latest(tmp_path):
    engine = FakeEngine()
    save(engine, tmp_path, 8)
    (tmp_path / ".partial-step00000012").mkdir()                       # killed while writing
    (tmp_path / ".partial-step00000012" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tmp_path / "step00000010").mkdir()                                # killed before marking
    (tmp_path / "step00000010" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step00000008"]
    assert latest("auto", tmp_path) == tmp_path / "step00000008"
    assert resume_candidates("auto", tmp_path) == [tmp_path / "step00000008"]
    assert latest("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint.*step00000008"):
        latest(str(tmp_path / "step00000010"), tmp_path)
    # the next save marks, renames, and clears what the killed run left
    save(engine, tmp_path, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000008", "step00000010",
                                                          "step00000016"]
    assert latest("auto", tmp_path) == tmp_path / "step00000016"


def test_complete_marker_records_sizes_and_old_ones_are_pruned(tmp_path):
    engine = FakeEngine()
    for step in (2, 4, 6, 8):
        save(engine, tmp_path, step, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step00000006", "step00000008"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000006", "step00000008"]
    marker = json.loads((tmp_path / "step00000008" / COMPLETE_MARKER).read_text())
    assert marker["step"] == 8
    saved = tmp_path / "step00000008" / OPTIM_STATES
    assert marker["files"][OPTIM_STATES] == saved.stat().st_size
    assert resume_candidates("auto", tmp_path) == [tmp_path / "step00000008",
                                                   tmp_path / "step00000006"]


# ---------------------------------------------------------------- corrupt checkpoints

def test_corrupt_latest_falls_back_to_previous_with_a_warning(tmp_path, capsys):
    for step in (4, 8, 12):
        save(FakeEngine(), tmp_path, step)
    # step 12: DeepSpeed fails to read it; step 8: a file was truncated after it was saved
    saved_size = (tmp_path / "step00000008" / MODEL_STATES).stat().st_size
    with open(tmp_path / "step00000008" / MODEL_STATES, "r+b") as file:
        file.truncate(10)
    engine = FakeEngine(fail_load={"step00000012"})
    with pytest.warns(CheckpointFallbackWarning) as caught:
        path, client_state = load_checkpoint_auto(engine, tmp_path)
    assert path == tmp_path / "step00000004" and client_state["step"] == 4
    assert engine.loaded == ["step00000012", "step00000004"]   # step 8 failed its size check
    messages = [str(w.message) for w in caught]
    assert any("step00000012" in m and "PytorchStreamReader" in m for m in messages), messages
    assert any("step00000008" in m and f"10 bytes, {saved_size}" in m for m in messages), messages
    err = capsys.readouterr().err
    assert "falling back to " + str(tmp_path / "step00000008") in err
    assert "falling back to " + str(tmp_path / "step00000004") in err


def test_no_loadable_checkpoint_is_an_error_and_none_is_a_fresh_start(tmp_path):
    assert load_checkpoint_auto(FakeEngine(), tmp_path) is None
    assert load_checkpoint(FakeEngine(), resume_candidates("none", tmp_path)) is None
    save(FakeEngine(), tmp_path, 4)
    with pytest.warns(CheckpointFallbackWarning):
        with pytest.raises(CheckpointLoadError, match="step00000004.*--run.resume none"):
            load_checkpoint_auto(FakeEngine(fail_load={"step00000004"}), tmp_path)
    (tmp_path / "step00000004" / "client.json").unlink()
    with pytest.warns(CheckpointFallbackWarning, match="client.json is missing"):
        with pytest.raises(CheckpointLoadError):
            load_checkpoint_auto(FakeEngine(), tmp_path)


def _agreement_worker(rank, world_size, init_file, directory, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        # only rank 1 cannot read the newest checkpoint: rank 0 must skip it too
        engine = FakeEngine(fail_load={"step00000008"} if rank == 1 else set())
        with pytest.warns(CheckpointFallbackWarning) if rank == 1 else _nothing():
            path, state = load_checkpoint_auto(engine, Path(directory))
        results[rank] = (path.name, state["step"], engine.loaded)
    finally:
        dist.destroy_process_group()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_all_ranks_skip_a_checkpoint_any_rank_cannot_load(tmp_path):
    for step in (4, 8):
        save(FakeEngine(), tmp_path / "ckpt", step)
    results = mp.Manager().dict()
    mp.start_processes(_agreement_worker, nprocs=2, join=True, start_method="fork",
                       args=(2, str(tmp_path / "init"), str(tmp_path / "ckpt"), results))
    assert dict(results) == {0: ("step00000004", 4, ["step00000008", "step00000004"]),
                             1: ("step00000004", 4, ["step00000008", "step00000004"])}


def _two_nodes_save_worker(rank, world_size, init_file, directory, errors):
    """One rank per node (LOCAL_RANK 0 on both) saving into one shared out_dir; rank 0 is the
    slower of the two to look at the finished checkpoint."""
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        if rank == 0:
            sizes = checkpoint._file_sizes

            def slow_sizes(path):
                time.sleep(1)
                return sizes(path)

            checkpoint._file_sizes = slow_sizes
        save(FakeEngine(), Path(directory), 3)
    except Exception as err:
        errors[rank] = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()


def test_two_nodes_on_a_shared_file_system_complete_a_checkpoint_once(tmp_path):
    errors = mp.Manager().dict()
    mp.start_processes(_two_nodes_save_worker, nprocs=2, join=True, start_method="fork",
                       args=(2, str(tmp_path / "init"), str(tmp_path / "ckpt"), errors))
    assert dict(errors) == {}
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step00000003"]
    marker = json.loads((tmp_path / "ckpt" / "step00000003" / COMPLETE_MARKER).read_text())
    assert sorted(marker["files"]) == ["client.json", MODEL_STATES, OPTIM_STATES]


# ---------------------------------------------------------------- unwritable checkpoints

def _assert_previous_intact(directory):
    assert sorted(p.name for p in directory.iterdir()) == ["step00000004"]
    assert latest("auto", directory) == directory / "step00000004"
    path, state = load_checkpoint_auto(FakeEngine(), directory)
    assert state["step"] == 4


def test_disk_full_while_writing_raises_a_clear_error(tmp_path):
    save(FakeEngine(), tmp_path, 4)
    engine = FakeEngine(fail_save=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(CheckpointWriteError) as raised:
        save(engine, tmp_path, 8)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert str(tmp_path) in message and "No space left on device" in message, message
    assert "step00000008" in message and "run.keep_checkpoints" in message, message
    assert "GiB free" in message and "--run.resume auto" in message, message
    _assert_previous_intact(tmp_path)          # and the half-written .partial-* is gone


def test_torch_save_failure_raises_a_clear_error(tmp_path):
    save(FakeEngine(), tmp_path, 4)
    failure = RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0"
                           " PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.raises(CheckpointWriteError, match="file write failed.*free space"):
        save(FakeEngine(fail_save=failure), tmp_path, 8)
    _assert_previous_intact(tmp_path)
    with pytest.raises(RuntimeError, match="Connection closed by peer") as raised:
        save(FakeEngine(fail_save=RuntimeError("[gloo] Connection closed by peer")), tmp_path, 8)
    assert not isinstance(raised.value, CheckpointWriteError)   # not blamed on the disk


@pytest.mark.parametrize("same_step", [False, True], ids=["new-step", "same-step"])
def test_permission_error_while_completing_raises_and_keeps_the_previous(tmp_path, monkeypatch,
                                                                         same_step):
    # tests run as root, where a read-only directory is still writable: fail the rename instead
    save(FakeEngine(), tmp_path, 4)
    real_replace = os.replace

    def replace(source, target):
        if Path(source).name.startswith(".partial-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        return real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(CheckpointWriteError) as raised:
        save(FakeEngine(), tmp_path, 4 if same_step else 8)
    message = str(raised.value)
    assert raised.value.errno == errno.EACCES
    assert str(tmp_path) in message and "Permission denied" in message, message
    assert "writable" in message, message
    _assert_previous_intact(tmp_path)


def test_permission_error_from_deepspeed_raises_a_clear_error(tmp_path):
    save(FakeEngine(), tmp_path, 4)
    failure = PermissionError(errno.EACCES, os.strerror(errno.EACCES),
                              str(tmp_path / ".partial-step00000008"))
    with pytest.raises(CheckpointWriteError, match="Permission denied.*writable"):
        save(FakeEngine(fail_save=failure), tmp_path, 8)
    _assert_previous_intact(tmp_path)


def test_metrics_rows_after_the_resumed_step_and_a_cut_row_are_dropped(tmp_path):
    rows = [{"step": step, "loss/total": 1.0 / step} for step in range(1, 8)]
    lines = [json.dumps(row) for row in rows]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:9])  # killed
    keep_rows_up_to(tmp_path / "metrics.jsonl", 4)
    assert _rows(tmp_path) == rows[:4]
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.jsonl"]   # no temporary


# ---------------------------------------------------------------- kill -9 on 2 CPU ranks

MAX_STEPS = 24
SAVE_EVERY = 3


def _command(train_assets, out_dir, **extra):
    values = overrides(train_assets, out_dir, **{"optim.max_steps": MAX_STEPS,
                                           "run.save_every": SAVE_EVERY, **extra})
    command = [str(REPO / "launch.sh"), "--config", str(CONFIG)]
    for key, value in values.items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    env = dict(os.environ, COLLD_CPU_RANKS="2", COLLD_PYTHON=sys.executable)
    return command, env


def _rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _launch(train_assets, out_dir, **extra) -> tuple[list[dict], str]:
    command, env = _command(train_assets, out_dir, **extra)
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _rows(out_dir), done.stdout + done.stderr


def _group(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def _rank_process(launcher: subprocess.Popen, rank: str) -> psutil.Process:
    """The training process of ``rank`` under the launcher (not its data loader worker)."""
    ranks = []
    for proc in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if (proc.environ().get("RANK") == rank and "colld_ds.cli" in proc.cmdline()
                    and "RANK" not in proc.parent().environ()):
                ranks.append(proc)
        except psutil.Error:          # a short-lived helper process that is already gone
            pass
    assert len(ranks) == 1, ranks
    return ranks[0]


@pytest.fixture(scope="module")
def reference(train_assets):
    rows, _ = _launch(train_assets, train_assets["root"] / "reference")
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1))
    return {row["step"]: row["loss/total"] for row in rows}


@contextlib.contextmanager
def _running(train_assets, out_dir):
    """A 2-rank launch.sh run in its own process group, killed whole on the way out."""
    command, env = _command(train_assets, out_dir)
    launcher = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield launcher
    finally:
        kill_group(launcher)


def _signal_rank_1(launcher, ready, what: str, signum: int, timeout: float) -> str:
    """Once ``ready()``, send ``signum`` to rank 1; the launcher's output when it has ended."""
    deadline = time.monotonic() + 120
    while not ready():
        assert launcher.poll() is None, f"the run ended before {what}: " + \
            launcher.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"not {what} within 120 s"
        time.sleep(0.02)
    _rank_process(launcher, "1").send_signal(signum)
    return launcher.communicate(timeout=timeout)[0].decode()


@pytest.fixture(scope="module")
def killed(train_assets):
    """A 2-rank run whose rank 1 got SIGKILL once two checkpoints were complete."""
    out_dir = train_assets["root"] / "killed"
    with _running(train_assets, out_dir) as launcher:
        output = _signal_rank_1(
            launcher, lambda: len(complete_checkpoints(out_dir / "checkpoints")) >= 2,
            "two checkpoints", signal.SIGKILL, timeout=60)
        assert launcher.returncode != 0, output[-3000:]
        deadline = time.monotonic() + 15     # dataloader workers notice their parent is gone
        while _group(launcher.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in _group(launcher.pid) if p.environ().get("RANK")], \
            "ranks outlived the job"
    checkpoints = out_dir / "checkpoints"
    # whatever the kill interrupted, every checkpoint under a final name is complete
    assert all((path / COMPLETE_MARKER).is_file() for path in checkpoints.iterdir()
               if path.name.startswith("step")), list(checkpoints.iterdir())
    rows = _rows(out_dir)
    assert rows and rows[-1]["step"] < MAX_STEPS, "the kill came too late"
    return out_dir


def _resume_and_compare(train_assets, source, out_dir, expected_checkpoint, reference):
    if out_dir != source:
        shutil.copytree(source, out_dir)
    step = json.loads((expected_checkpoint / COMPLETE_MARKER).read_text())["step"]
    rows, output = _launch(train_assets, out_dir, **{"run.resume": "auto"})
    # the rows the killed run logged after the checkpoint are dropped: each step once
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1)), output[-3000:]
    resumed = {row["step"]: row["loss/total"] for row in rows[step:]}
    assert f"resuming from {out_dir / 'checkpoints' / expected_checkpoint.name}" in output
    for index in range(step + 1, MAX_STEPS + 1):
        assert resumed[index] == pytest.approx(reference[index], rel=1e-5, abs=1e-6), index
    return output


def test_killed_rank_then_resume_auto_matches_uninterrupted(train_assets, killed, reference):
    latest = complete_checkpoints(killed / "checkpoints")[-1]
    _resume_and_compare(train_assets, killed, train_assets["root"] / "killed-resumed", latest,
                        reference)


def test_corrupt_latest_after_kill_resumes_from_previous(train_assets, killed, reference):
    if train_module.__dict__.get("load_checkpoint") is not load_checkpoint:
        pytest.skip("colld_ds/train.py does not load through checkpoint.load_checkpoint yet")
    out_dir = train_assets["root"] / "killed-corrupt"
    shutil.copytree(killed, out_dir)
    *_, previous, latest = complete_checkpoints(out_dir / "checkpoints")
    model_file = next(latest.glob("*model_states.pt"))
    with open(model_file, "r+b") as file:      # same size: DeepSpeed's own load must fail
        file.write(bytes(4096))
    output = _resume_and_compare(train_assets, out_dir, out_dir, previous, reference)
    assert f"checkpoint {latest} could not be loaded" in output, output[-3000:]
    assert f"falling back to {previous}" in output, output[-3000:]


# --- shard writers: disk full / permissions ----------------------------------------------------


def test_disk_full_while_writing_a_shard_keeps_finished_ones(tmp_path, monkeypatch):
    from webdataset import TarWriter


    out = tmp_path / "shards"
    real_write, writes = TarWriter.write, []

    def write_until_full(self, sample):
        writes.append(sample["__key__"])
        if len(writes) == 8:                       # the 2nd sample of the 3rd shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, sample)

    monkeypatch.setattr(TarWriter, "write", write_until_full)
    with pytest.raises(ShardWriteError) as raised:
        write_audio_shards(generate_utterances(9, seed=0), str(out), max_count=3, progress=False)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert "train-000002.tar" in message and "No space left on device" in message, message
    assert "Free disk space" in message and "re-run" in message, message
    assert sorted(p.name for p in out.glob("*.tar*")) == ["train-000000.tar", "train-000001.tar"]
    assert shard_keys(str(out / "train-000001.tar")) == writes[3:6]
    mtimes = [p.stat().st_mtime_ns for p in sorted(out.glob("*.tar"))]

    monkeypatch.setattr(TarWriter, "write", real_write)   # space freed: the re-run resumes
    paths = write_audio_shards(generate_utterances(9, seed=0), str(out), max_count=3,
                               progress=False)
    assert [os.stat(p).st_mtime_ns for p in paths[:2]] == mtimes
    assert [len(shard_keys(p)) for p in paths] == [3, 3, 3]


def test_permission_error_while_writing_a_cache_shard_is_clear(tmp_path, monkeypatch):
    teacher = make_tiny_teacher("wav2vec2", str(tmp_path / "teacher"), num_layers=2)
    shards.write_audio_shards(generate_utterances(4, seed=0), str(tmp_path / "audio"),
                              max_count=2, progress=False)
    out = tmp_path / "cache"
    real_replace = os.replace

    def refuse_second(src, dst):
        if str(dst).endswith("train-000001.tar"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", refuse_second)
    with pytest.raises(shards.ShardWriteError, match=r"train-000001.tar: Permission denied.*"
                                                     r"permissions of"):
        cache_teacher(str(tmp_path / "audio"), teacher, "1,2", str(out), progress=False)
    assert sorted(p.name for p in out.glob("*.tar*")) == ["train-000000.tar"]
    assert shard_keys(str(out / "train-000000.tar"))


def test_sigterm_to_one_rank_stops_all_at_a_checkpoint_of_that_step(train_assets, reference):
    """A scheduler's SIGTERM (or SIGUSR1) reaching one rank: every rank finishes the step, they
    save a checkpoint of it together and exit 143; resuming from it matches the uninterrupted
    run (no step lost, no batch skipped)."""
    out_dir = train_assets["root"] / "sigterm"
    with _running(train_assets, out_dir) as launcher:
        output = _signal_rank_1(
            launcher, lambda: (out_dir / "metrics.jsonl").is_file() and len(_rows(out_dir)) >= 4,
            "four steps", signal.SIGTERM, timeout=120)
    assert launcher.returncode != 0, output[-3000:]
    assert "stopped on request (SIGTERM on a rank) after step" in output, output[-3000:]
    stopped = _rows(out_dir)[-1]["step"]
    assert stopped < MAX_STEPS, "the signal came too late"
    latest = complete_checkpoints(out_dir / "checkpoints")[-1]
    assert json.loads((latest / COMPLETE_MARKER).read_text())["step"] == stopped
    _resume_and_compare(train_assets, out_dir, train_assets["root"] / "sigterm-resumed", latest,
                        reference)
