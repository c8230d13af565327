"""Fixtures shared by several test modules: a tiny teacher with training shards, one tiny
trained run, and faiss on one thread. Plain helpers are in helpers.py."""

import os
import subprocess
import sys

import pytest
import torch

from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from helpers import CONFIG, REPO, tiny_teacher_and_shards


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory) -> dict:
    """A 4-layer, 32-wide random wav2vec 2.0 teacher and 32 generated utterances in 4 shards:
    ``{"root", "teacher", "shards"}``."""
    root = tmp_path_factory.mktemp("train")
    teacher = make_tiny_teacher("wav2vec2", str(root / "teacher"), seed=0, num_layers=4,
                                hidden_size=32)
    write_audio_shards(generate_utterances(32, seed=1), str(root / "shards"), max_count=8,
                       progress=False)
    return {"root": root, "teacher": teacher, "shards": str(root / "shards")}


# The real `train` in one CPU process, ZeRO-3, 3 steps; while it saves, the live engine's
# gathered weights are dumped as reference.pt, which consolidation is checked against.
_TRAIN = r"""
import os, socket, sys
import torch
root, config, teacher, shards = sys.argv[1:5]
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
import deepspeed
import colld_ds.train as train_module
from colld_ds.config import load_config

save = train_module.save_checkpoint
def save_and_dump(engine, *args, **kwargs):
    path = save(engine, *args, **kwargs)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    torch.save(state, os.path.join(root, "reference.pt"))
    return path
train_module.save_checkpoint = save_and_dump
train_module.train(load_config(config, {
    "teacher.path": teacher, "data.train_shards": shards, "run.out_dir": os.path.join(root, "run"),
    "optim.max_steps": 3, "optim.warmup_steps": 1, "run.save_every": 3, "data.num_workers": 0,
    "run.zero_stage": 3, "optim.lr": 5e-3}))
"""


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """One tiny run shared by the session (1 CPU process, ZeRO-3, 3 steps (DeepSpeed's linear
    warm-up gives lr 0 to the first two), through the real ``train``): ``{"root", "teacher",
    "heldout", "checkpoint", "reference"}`` (``reference``: the engine's weights as saved)."""
    root = tmp_path_factory.mktemp("trained-run")
    teacher, train, _ = tiny_teacher_and_shards(root)
    done = subprocess.run([sys.executable, "-c", _TRAIN, str(root), str(CONFIG), teacher, train],
                          cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"root": root, "teacher": teacher, "heldout": str(root / "heldout"),
            "checkpoint": root / "run" / "checkpoints" / "step00000003",
            "reference": torch.load(root / "reference.pt")}


@pytest.fixture(scope="module")
def one_faiss_thread():
    """k-means on one thread (codebook tests: ``pytestmark = pytest.mark.usefixtures(...)``):
    faiss's OpenMP threads wait for each other at every step, and on a loaded 2-core machine
    that made tests/test_cache_pq.py 20x slower (56 s instead of 2.5 s). faiss is imported
    here, not at the top: the GPU suite runs tests without it (scripts/device_wheels.sh)."""
    import faiss  # noqa: PLC0415

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
