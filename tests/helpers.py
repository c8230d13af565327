"""Helpers shared by several test modules (their fixtures are in conftest.py)."""

import itertools
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import torch

from colld_ds.checkpoint import save_checkpoint
from colld_ds.layer_map import LayerPair
from colld_ds.report import EncoderSize, FidelityReport, LossCurves, ModelFidelity
from data_prep.generated_audio import generate_utterances
from data_prep.shards import write_audio_shards
from data_prep.tiny_teacher import make_tiny_teacher

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml"
MAX_STEPS = 16
"""Optimiser steps of a run made with ``overrides``."""


def overrides(assets: dict, out_dir, **extra) -> dict:
    """Config overrides of a short run of CONFIG on the ``train_assets`` fixture into
    ``out_dir``: MAX_STEPS steps, logged every step, saved every 8; ``extra`` on top."""
    values = {"teacher.path": assets["teacher"], "data.train_shards": assets["shards"],
              "run.out_dir": str(out_dir), "optim.max_steps": MAX_STEPS, "run.log_every": 1,
              "run.save_every": 8, "optim.warmup_steps": 2, "optim.lr": 1e-3}
    values.update(extra)
    return values


def tiny_teacher_and_shards(root: Path) -> tuple[str, str, str]:
    """A 4-layer, 32-wide random wav2vec 2.0 teacher, 8 training utterances (one shard) and 6
    held-out ones (`test-*.tar`) under `root` -> (teacher dir, train dir, held-out dir)."""
    teacher = make_tiny_teacher("wav2vec2", str(root / "teacher"), seed=0, num_layers=4,
                                hidden_size=32)
    write_audio_shards(generate_utterances(8, seed=1), str(root / "train"), max_count=8,
                       progress=False)
    write_audio_shards(generate_utterances(6, seed=2), str(root / "heldout"), prefix="test",
                       max_count=8, progress=False)
    return teacher, str(root / "train"), str(root / "heldout")


def fidelity_report(pairs: list[str], models: dict[str, ModelFidelity], student_parameters=1000,
                    **fields) -> FidelityReport:
    """A hand-made eval report of ``models`` on pairs named ``s<k>_t<l>``; the other fields are
    placeholders unless given."""
    values = dict(
        checkpoint="/runs/x/checkpoints/step00000006", shards="test", utterances=6,
        audio_seconds=9.0, frames=400, target_kind="layer_output",
        pairs=[LayerPair(*map(int, re.findall(r"\d+", name))) for name in pairs],
        teacher=EncoderSize(4, 5000, 0.02, 0.1, "teacher"),
        student=EncoderSize(2, student_parameters, 0.004, 0.05), cpu_threads=1, models=models,
        loss_curves=LossCurves("no training logs", {}))
    return FidelityReport(**{**values, **fields})


def take(stream, n):
    """The first n batches of an `AudioBatchStream` (a fresh iterator)."""
    return list(itertools.islice(iter(stream), n))


def keys_of(batches):
    """Sample keys of batches, in order."""
    return [k for b in batches for k in b.keys]


# --- a stand-in for a DeepSpeed engine's checkpoint files -----------------------------------------

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FakeEngine:
    """What save_checkpoint / load_checkpoint use of a DeepSpeed engine: files on disk, loaded
    as DeepSpeed's TorchCheckpointEngine does (``weights_only=False``)."""

    def __init__(self, fail_save: BaseException | None = None, fail_load: set[str] = ()):
        self.fail_save, self.fail_load, self.loaded = fail_save, set(fail_load), []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        directory = Path(save_dir) / tag
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"weight": torch.zeros(8)}}, directory / MODEL_STATES)
        if self.fail_save is not None:      # half written, then the disk is full
            raise self.fail_save
        torch.save({"optimizer_state_dict": {"exp_avg": torch.zeros(16)}},
                   directory / OPTIM_STATES)
        (directory / "client.json").write_text(json.dumps(client_state))

    def load_checkpoint(self, load_dir, tag):
        directory = Path(load_dir) / tag
        self.loaded.append(tag)
        if tag in self.fail_load:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        for name in (MODEL_STATES, OPTIM_STATES):
            torch.load(directory / name, weights_only=False)
        return str(directory), json.loads((directory / "client.json").read_text())


def save(engine, directory, step, keep=3):
    """``save_checkpoint`` of step ``step`` with a minimal client state."""
    return save_checkpoint(engine, directory, step, {"step": step, "data": {}}, keep)


def kill_group(launcher: subprocess.Popen) -> None:
    """SIGKILL the process group ``launcher`` leads (started with ``start_new_session``) and
    reap it: no rank outlives a test."""
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launcher.wait()
