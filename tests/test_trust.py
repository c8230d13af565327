"""What colld refuses to unpickle: a checkpoint crafted to run code, at eval, export and resume;
a teacher directory with code or pickled weights.

The crafted checkpoints are copies of the shared tiny ZeRO-3 run (conftest.py) with one file
rewritten to carry a payload whose unpickling creates a file, and with ``complete.json``
rewritten to match, as whoever crafts one would. Refused means: an UnsafeCheckpointError naming
the file and what it asked for, and the payload's file never appears.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
from safetensors.torch import load_file

from colld_ds.checkpoint import (COMPLETE_MARKER, UnsafeCheckpointError, load_checkpoint,
                                 resume_candidates, safe_load, validate_checkpoint,
                                 weights_only_loads)
from colld_ds.evaluate import evaluate
from colld_ds.export import export
from colld_ds.models import load_teacher
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from helpers import CONFIG, OPTIM_STATES, REPO, FakeEngine, save

ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


class Payload:
    """Unpickling it creates ``path``: what a crafted checkpoint could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


def plant(file: Path, pwned: Path) -> None:
    """Rewrite checkpoint file ``file`` with a Payload beside its real content, and its
    checkpoint's ``complete.json`` to match."""
    state = torch.load(file, map_location="cpu", weights_only=False)   # our own file
    state["payload"] = Payload(pwned)
    torch.save(state, file)
    marker = file.parent / COMPLETE_MARKER
    record = json.loads(marker.read_text())
    record["files"][file.name] = file.stat().st_size
    marker.write_text(json.dumps(record))


def crafted_run(run: dict, root: Path, file_name: str) -> tuple[Path, Path]:
    """A copy of the shared run whose checkpoint file ``file_name`` carries a payload ->
    (the copy's checkpoint, the file the payload would create)."""
    shutil.copytree(run["root"] / "run", root / "run")
    checkpoint = root / "run" / "checkpoints" / run["checkpoint"].name
    pwned = root / "pwned"
    plant(checkpoint / file_name, pwned)
    return checkpoint, pwned


@pytest.mark.parametrize("file_name", [ZERO3_MODEL_STATES, OPTIM_STATES])
def test_export_and_eval_refuse_a_checkpoint_that_runs_code(trained_run, tmp_path, file_name):
    checkpoint, pwned = crafted_run(trained_run, tmp_path, file_name)
    refused = rf"{file_name} asks to unpickle posix\.system.*colld refuses it"
    with pytest.raises(UnsafeCheckpointError, match=refused):
        export(checkpoint, tmp_path / "export")
    with pytest.raises(UnsafeCheckpointError, match=refused):
        evaluate(tmp_path / "run", trained_run["heldout"], tmp_path / "eval", threads=1)
    assert not pwned.exists()
    assert not (tmp_path / "export").exists() and not (tmp_path / "eval").exists()


def _resume(run: dict, out_dir: Path) -> subprocess.CompletedProcess:
    """``colld train --run.resume auto`` of the shared run's config in ``out_dir``, to step 4."""
    values = {"teacher.path": run["teacher"], "data.train_shards": str(run["root"] / "train"),
              "run.out_dir": str(out_dir), "optim.max_steps": 4, "optim.warmup_steps": 1,
              "run.save_every": 4, "data.num_workers": 0, "run.zero_stage": 3,
              "optim.lr": 5e-3, "run.resume": "auto"}
    command = [sys.executable, "-m", "colld_ds.cli", "train", "--config", str(CONFIG)]
    for key, value in values.items():
        command += [f"--{key}", str(value)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return subprocess.run(command, env=dict(env, OMP_NUM_THREADS="1"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_resume_refuses_a_checkpoint_that_runs_code(trained_run, tmp_path):
    checkpoint, pwned = crafted_run(trained_run, tmp_path, ZERO3_MODEL_STATES)
    done = _resume(trained_run, tmp_path / "run")
    assert done.returncode != 0, done.stdout[-3000:]
    assert (f"colld: error: {checkpoint / ZERO3_MODEL_STATES} asks to unpickle "
            "posix.system") in done.stderr, done.stderr[-3000:]     # a user error: one line
    assert "Traceback" not in done.stderr
    assert not pwned.exists()
    assert not (tmp_path / "run" / "checkpoints" / "step00000004").exists()


def test_a_colld_checkpoint_still_resumes(trained_run, tmp_path):
    shutil.copytree(trained_run["root"] / "run", tmp_path / "run")
    done = _resume(trained_run, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / 'step00000003'} at step 3" \
        in done.stdout
    assert (tmp_path / "run" / "checkpoints" / "step00000004" / COMPLETE_MARKER).is_file()


def test_deepspeed_loads_inside_weights_only_loads_are_weights_only(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    file, pwned = tmp_path / "states.pt", tmp_path / "pwned"
    torch.save({"module": {"w": torch.ones(2)}, "payload": Payload(pwned)}, file)
    with weights_only_loads(), pytest.raises(Exception, match="posix.system"):
        torch.load(file, weights_only=False)          # what DeepSpeed's loaders pass
    assert not pwned.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    with pytest.raises(UnsafeCheckpointError, match=rf"{file} asks to unpickle posix\.system"):
        safe_load(file)
    assert not pwned.exists()


def test_every_file_of_a_colld_checkpoint_is_weights_only(trained_run, tmp_path):
    validate_checkpoint(trained_run["checkpoint"])          # ZeRO-3 (conftest.py)
    # fp16's dynamic loss scaler, which no CPU run pickles
    scaler = DynamicLossScaler(2.0**16, 1000, 1, 2, False)
    torch.save({"loss_scaler": scaler}, tmp_path / "optim_states.pt")
    assert vars(safe_load(tmp_path / "optim_states.pt")["loss_scaler"]) == vars(scaler)


def _ranks_worker(rank, world_size, init_file, directory, results):
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    engine = FakeEngine()
    try:
        load_checkpoint(engine, resume_candidates("auto", Path(directory)))
        results[rank] = "loaded"
    except UnsafeCheckpointError as err:
        results[rank] = (str(err), engine.loaded)
    finally:
        dist.destroy_process_group()


def test_every_rank_refuses_what_one_rank_found_unsafe_and_none_falls_back(tmp_path):
    """Each rank of a node checks its share of the files (here rank 1: the optimizer states):
    all refuse, none loads the older checkpoint instead."""
    for step in (4, 8):
        save(FakeEngine(), tmp_path / "ckpt", step)
    newest = tmp_path / "ckpt" / "step00000008"
    plant(newest / OPTIM_STATES, tmp_path / "pwned")
    results = mp.Manager().dict()
    mp.start_processes(_ranks_worker, nprocs=2, join=True, start_method="fork",
                       args=(2, str(tmp_path / "init"), str(tmp_path / "ckpt"), results))
    assert not (tmp_path / "pwned").exists()
    message, loaded = results[1]
    assert message.startswith(f"{newest / OPTIM_STATES} asks to unpickle posix.system")
    assert loaded == []
    assert results[0] == (f"checkpoint {newest}: another rank refused one of its files as "
                          "unsafe (its error names the file)", [])


def test_teacher_code_and_pickled_weights_are_never_run(tmp_path):
    """A teacher directory's own code is never imported (no ``trust_remote_code``) and a
    ``.bin`` is loaded weights-only."""
    teacher = Path(make_tiny_teacher("wav2vec2", str(tmp_path / "teacher"), seed=0,
                                     num_layers=2, hidden_size=32))
    pwned = tmp_path / "pwned"
    (teacher / "evil.py").write_text(f"open({str(pwned)!r}, 'w').close()\n")
    config = json.loads((teacher / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (teacher / "config.json").write_text(json.dumps(config))
    assert load_teacher(str(teacher), [1, 2]).layers == [1, 2]
    assert not pwned.exists()

    state = load_file(teacher / "model.safetensors")
    (teacher / "model.safetensors").unlink()
    torch.save({**state, "payload": Payload(pwned)}, teacher / "pytorch_model.bin")
    with pytest.raises(Exception, match="posix.system"):
        load_teacher(str(teacher), [1, 2])
    assert not pwned.exists()
