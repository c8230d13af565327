"""A finished run's student back from its DeepSpeed checkpoint, for the programs that read one
(``colld eval``, ``colld export``, the benchmarks).

``load_student(checkpoint)`` consolidates the checkpoint's fp32 weights with DeepSpeed's own
``zero_to_fp32`` (ZeRO 1/2/3, the shards of every rank merged; stage 0 reads the module
states), every file weights-only (``colld_ds.checkpoint``: one that needs more is refused
before anything is read), rebuilds the run with ``distill.build_run`` from the config saved in
the checkpoint (its client state; ``out_dir/config.yaml`` as a fallback) and loads the weights
strictly.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from colld_ds.checkpoint import (COMPLETE_MARKER, complete_checkpoints, safe_load,
                                 validate_checkpoint, verify_checkpoint, weights_only_loads)
from colld_ds.config import TrainConfig, load_config
from colld_ds.distill import DistillationModel, build_run
from colld_ds.errors import ColldError
from colld_ds.layer_map import LayerPair
from colld_ds.models import Teacher


class CheckpointNotFoundError(ColldError, FileNotFoundError):
    """The path is not a complete colld checkpoint (and holds none)."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint directory from ``path``: the checkpoint itself
    (``out_dir/checkpoints/stepNNNNNNNN``), or a run's ``out_dir`` / ``checkpoints`` directory
    (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    if (path / COMPLETE_MARKER).is_file():
        return path
    for directory in (path / "checkpoints", path):
        found = complete_checkpoints(directory)
        if found:
            return found[-1]
    complete = complete_checkpoints(path.parent)
    raise CheckpointNotFoundError(
        f"checkpoint {path} is not a complete checkpoint (no {COMPLETE_MARKER}: it was not "
        f"finished, or it is not a colld checkpoint directory); complete ones next to it: "
        f"{[str(p) for p in complete] or 'none'}")


def _model_states_file(checkpoint: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (checkpoint / name).is_file():
            return checkpoint / name
    raise CheckpointNotFoundError(f"checkpoint {checkpoint} has no DeepSpeed model states file "
                                  "(mp_rank_00_model_states.pt)")


def checkpoint_config(checkpoint: Path) -> TrainConfig:
    """The run config saved with ``checkpoint`` (client state), else ``out_dir/config.yaml``."""
    states = safe_load(_model_states_file(checkpoint), mmap=True)
    if isinstance(states.get("config"), dict):
        return load_config(None, states["config"])
    yaml_file = checkpoint.parent.parent / "config.yaml"
    if yaml_file.is_file():
        return load_config(yaml_file)
    raise CheckpointNotFoundError(f"checkpoint {checkpoint} has no config in its client state "
                                  f"and there is no {yaml_file}")


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole DistillationModel, merged from every rank's ZeRO shards; every
    file loaded weights-only (``colld_ds.checkpoint.safe_load``)."""
    if not list(checkpoint.glob("*_optim_states.pt")):       # ZeRO stage 0: the module itself
        states = safe_load(_model_states_file(checkpoint))
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    # zero_to_fp32 passes weights_only=False (made weights-only here) and prints its progress
    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent),
                                                        tag=checkpoint.name)


def load_student(checkpoint_path: str | Path, teacher_path: str | None = None
                 ) -> tuple[TrainConfig, Teacher, list[LayerPair], DistillationModel]:
    """-> (config, teacher, pairs, model): ``model`` is the run's ``DistillationModel`` (student
    + projection heads) with the checkpoint's fp32 weights, on CPU, in eval mode.

    ``teacher_path`` replaces the config's ``teacher.path`` (a teacher moved since training).
    Raises CheckpointNotFoundError naming the path when it is not a complete checkpoint, and
    UnsafeCheckpointError naming the file when one is not weights-only (checked before anything
    else is read)."""
    checkpoint = resolve_checkpoint(checkpoint_path)
    try:
        verify_checkpoint(checkpoint)
    except OSError as err:
        raise CheckpointNotFoundError(f"checkpoint {checkpoint} is damaged: {err}") from err
    validate_checkpoint(checkpoint)
    config = checkpoint_config(checkpoint)
    if teacher_path is not None:
        config.teacher.path = str(teacher_path)
    config.teacher.dtype = "fp32"
    if not (config.data.train_shards or config.data.teacher_cache):
        config.data.train_shards = "unused"        # build_run insists; nothing is read here
    teacher, pairs, model = build_run(config, torch.device("cpu"))
    state = consolidated_state_dict(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not fit the model its config builds: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.eval()
    return config, teacher, pairs, model


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` CPU threads in torch (None: as it is); yields the count."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
