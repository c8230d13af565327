"""Checkpoints that are complete or invisible, and loads that fall back past corrupt ones.

DeepSpeed writes each checkpoint under a temporary tag (``.partial-step00000100``); once every
rank has written its part, the first process of each node marks it complete (``complete.json``,
which also records every file's size) and renames it to ``step00000100``. ``--run.resume auto``
only ever considers complete, renamed checkpoints, so a run killed while saving resumes from the
previous one. ``load_checkpoint`` tries them newest first: one that fails to load on any rank
(truncated or missing files, unreadable pickles) is skipped on every rank, with a warning, in
favour of the previous one.

Writing errors (disk full, no permission) raise ``CheckpointWriteError`` naming the directory
and the cause; the previous checkpoints are never touched before the new one is complete. The
failing rank raises at once, without a collective that the other ranks (still inside
DeepSpeed's own barriers) would not match; its exit makes the launcher end the job.

Checkpoints are loaded weights-only: a checkpoint directory is what people pass around, and
unpickling one runs whatever code it carries. ``safe_load`` is ``torch.load(weights_only=True)``
allowing tensors, containers and the few plain state classes DeepSpeed pickles
(``deepspeed_state_types``), nothing else. DeepSpeed's own loaders (``load_checkpoint``,
``zero_to_fp32``) pass ``weights_only=False``; inside ``weights_only_loads`` torch's documented
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes them weights-only with the same allow-list, without
patching DeepSpeed. Before any load, ``validate_checkpoint`` loads every ``*.pt`` of the
checkpoint that way (tensors memory-mapped, not read), so a file that asks for anything else is
refused with ``UnsafeCheckpointError`` naming it, on every rank, with no fallback to an older
checkpoint. A hash manifest written at save time would not do: whoever crafts a checkpoint
writes a matching manifest.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import functools
import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from colld_ds.errors import ColldError

COMPLETE_MARKER = "complete.json"
_TAG = re.compile(r"^step(\d{8})$")
_STALE = (".partial-step", ".deleting-step", ".replaced-step")
# how torch.save reports a full disk or a refused write: RuntimeError, not OSError
_WRITE_FAILURE = re.compile(r"PytorchStreamWriter|file write failed|No space left|"
                            r"Permission denied|Read-only file system|Disk quota")


class CheckpointWriteError(ColldError, OSError):
    """A checkpoint could not be written; the previous complete ones are intact."""


class CheckpointLoadError(ColldError, RuntimeError):
    """No candidate checkpoint could be loaded on every rank."""


class CheckpointFallbackWarning(UserWarning):
    """A checkpoint could not be loaded and was skipped for an older one."""


class UnsafeCheckpointError(ColldError, RuntimeError):
    """A checkpoint file asks to unpickle more than tensors, containers and DeepSpeed's state
    types: it could run code, so it is not loaded."""


@functools.cache
def deepspeed_state_types() -> tuple[type, ...]:
    """The classes a DeepSpeed checkpoint pickles besides tensors, containers and dtypes: the
    only ones ``safe_load`` allows. Found with ``get_unsafe_globals_in_checkpoint`` on runs of
    ZeRO 0-3, fp32 and bf16, with and without offload; ``DynamicLossScaler`` is fp16's loss
    scaler (DeepSpeed's source). Plain state holders: building them runs no code of the file's
    choosing. DeepSpeed is imported on use: ``colld compare`` and ``demo`` import this module."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside, DeepSpeed's ``weights_only=False`` ones included, loads
    weights-only allowing ``deepspeed_state_types`` (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``);
    the environment is restored on the way out."""
    saved = {name: os.environ.pop(name, None)
             for name in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(list(deepspeed_state_types())):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def safe_load(file: Path, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file on the CPU, weights-only (``weights_only_loads``).

    Raises UnsafeCheckpointError naming the file and what it asked for when it needs another
    global; a corrupt file raises what torch raises (so ``load_checkpoint`` falls back)."""
    try:
        with weights_only_loads():
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        asked = re.search(r"GLOBAL (\S+)", str(err))
        if asked is None:
            raise
        raise UnsafeCheckpointError(
            f"{file} asks to unpickle {asked.group(1)}, which is not a tensor, a container or "
            "one of DeepSpeed's state types: loading it could run code, so colld refuses it. "
            "Use only checkpoints you or your runs wrote (see 'What colld trusts' in "
            "README.md); if your own run wrote it with a DeepSpeed that pickles a new state "
            "type, add that type to colld_ds.checkpoint.deepspeed_state_types") from None


def validate_checkpoint(path: Path, part: int = 0, parts: int = 1) -> None:
    """``safe_load`` every ``*.pt`` file of checkpoint ``path`` (tensors memory-mapped, not
    read); with ``parts`` > 1 only every ``parts``-th file from the ``part``-th, so that the
    ranks of a node share the work. Raises UnsafeCheckpointError at the first unsafe file."""
    for file in sorted(Path(path).rglob("*.pt"))[part::parts]:
        safe_load(file, mmap=zipfile.is_zipfile(file))   # mmap needs torch's zip format


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints under ``checkpoint_dir``, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [path for path in checkpoint_dir.iterdir()
             if _TAG.match(path.name) and (path / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda path: path.name)


def resume_candidates(resume: str, checkpoint_dir: Path) -> list[Path]:
    """Checkpoints to try, in order: ``none`` -> []; ``auto`` -> every complete checkpoint,
    newest first; else that one path (which must be complete)."""
    checkpoint_dir = Path(checkpoint_dir)
    if resume == "none":
        return []
    if resume == "auto":
        return complete_checkpoints(checkpoint_dir)[::-1]
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(
            f"run.resume: {path} is not a complete checkpoint (no {COMPLETE_MARKER}); "
            f"complete ones in {checkpoint_dir}: "
            f"{[p.name for p in complete_checkpoints(checkpoint_dir)] or 'none'}")
    return [path]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _count_failures(failed: bool) -> int:
    """Collective: how many ranks report ``failed``."""
    if not _distributed():
        return int(failed)
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    flag = torch.tensor([int(failed)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(flag.item())


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_size
            for path in sorted(directory.rglob("*")) if path.is_file()
            and path.name != COMPLETE_MARKER}


def verify_checkpoint(path: Path) -> None:
    """Raise if a file recorded in ``complete.json`` is missing or has another size."""
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    for name, size in (marker.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing")
        if file.stat().st_size != size:
            raise OSError(f"{file} has {file.stat().st_size} bytes, {size} when it was saved "
                          "(truncated or overwritten)")


def _warn(message: str) -> None:
    warnings.warn(message, CheckpointFallbackWarning, stacklevel=3)


def load_checkpoint(engine, candidates: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """Collective: load the first of ``candidates`` that every rank can load.

    A candidate that fails on any rank (an exception from DeepSpeed, no client state, a file
    missing or of another size than when saved) is skipped on every rank with a warning, and
    the next is tried. Returns (path, client_state), None when there are no candidates, and
    raises CheckpointLoadError when none could be loaded. A candidate with a file that is not
    weights-only (``validate_checkpoint``) raises UnsafeCheckpointError on every rank before
    DeepSpeed reads anything; DeepSpeed then loads inside ``weights_only_loads``."""
    if _distributed():      # every rank walks the same list, so the collectives match
        shared = [[str(path) for path in candidates]]
        dist.broadcast_object_list(shared, src=0)
        candidates = [Path(path) for path in shared[0]]
    if not candidates:
        return None
    errors = []
    for path in candidates:
        error: str | None = None
        unsafe: UnsafeCheckpointError | None = None
        client_state: Any = None
        try:      # the ranks of each node split the files between them
            verify_checkpoint(path)
            validate_checkpoint(path, int(os.environ.get("LOCAL_RANK", 0)),
                                int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        except UnsafeCheckpointError as err:
            unsafe = err
        except Exception as err:       # corrupt pickles raise anything: skip them all alike
            error = f"{type(err).__name__}: {err}"
        if _count_failures(unsafe is not None):
            raise unsafe or UnsafeCheckpointError(
                f"checkpoint {path}: another rank refused one of its files as unsafe (its "
                "error names the file)")
        if error is None:
            try:
                with weights_only_loads():
                    load_path, client_state = engine.load_checkpoint(str(path.parent),
                                                                     tag=path.name)
                if load_path is None or not isinstance(client_state, dict) \
                        or "step" not in client_state:
                    error = "DeepSpeed found no loadable model states (files missing?)"
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        if error is not None:
            _warn(f"[colld] rank {_rank()}: checkpoint {path} could not be loaded ({error}); "
                  "skipping it")
        failures = _count_failures(error is not None)
        if failures == 0:
            return path, client_state
        errors.append(f"{path.name}: {error or 'failed on another rank'}")
        if _rank() == 0:
            rest = candidates[candidates.index(path) + 1:]
            print(f"[colld] WARNING: checkpoint {path} could not be loaded on {failures} "
                  f"rank(s) ({error or 'see their warnings'}); "
                  f"{'falling back to ' + str(rest[0]) if rest else 'no older one left'}",
                  file=sys.stderr, flush=True)
    raise CheckpointLoadError(
        f"no checkpoint could be loaded ({'; '.join(errors)}). Move the broken ones out of "
        f"{candidates[0].parent} or start afresh with --run.resume none")


def _write_error(err: BaseException, directory: Path, what: str) -> CheckpointWriteError:
    code = getattr(err, "errno", None)
    cause = os.strerror(code) if code else str(err)
    if code == errno_codes.ENOSPC or "No space" in str(err) or "file write failed" in str(err):
        try:
            free = shutil.disk_usage(directory if directory.exists() else directory.parent).free
            cause += f" ({free / 2**30:.2f} GiB free)"
        except OSError:
            pass
        fix = ("free space on that file system, lower run.keep_checkpoints, or point "
               "run.out_dir at a larger one")
    elif code in (errno_codes.EACCES, errno_codes.EPERM, errno_codes.EROFS):
        fix = "make it writable by this user, or point run.out_dir at a writable directory"
    else:
        fix = "check that file system, or point run.out_dir elsewhere"
    message = (f"could not {what} in {directory}: {cause} [{type(err).__name__}: {err}]. "
               f"The previous complete checkpoints there are intact; {fix}, then resume with "
               "--run.resume auto")
    return CheckpointWriteError(code, message) if code else CheckpointWriteError(message)


def _remove(path: Path) -> None:
    """Rename out of sight first, so a kill during the removal leaves no complete-looking dir."""
    doomed = path.with_name(f".deleting-{path.name}")
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict[str, Any],
                    keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path.

    Raises CheckpointWriteError (on the rank that met it) when the checkpoint cannot be
    written; nothing but its own ``.partial-*`` directory is touched (and that is removed)."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = checkpoint_tag(step)
    partial = checkpoint_dir / f".partial-{tag}"
    final = checkpoint_dir / tag
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=partial.name, client_state=client_state,
                               save_latest=False)
    except (OSError, RuntimeError) as err:
        if not isinstance(err, OSError) and not _WRITE_FAILURE.search(str(err)):
            raise             # e.g. a collective failing because another rank died
        shutil.rmtree(partial, ignore_errors=True)   # the space it took, back
        raise _write_error(err, checkpoint_dir, f"write checkpoint {tag}") from err
    _barrier()
    # DeepSpeed writes the model states from rank 0 only, so a checkpoint is whole on a shared
    # file system alone, and rank 0 alone completes it (one writer per node raced there).
    if _rank() == 0:
        replaced = None
        try:
            marker = {"step": step, "time": time.time(), "files": _file_sizes(partial)}
            (partial / COMPLETE_MARKER).write_text(json.dumps(marker))
            if final.exists():        # a resumed run saving the same step again
                replaced = final.with_name(f".replaced-{tag}")
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(partial, final)
        except OSError as err:
            if replaced is not None and replaced.exists() and not final.exists():
                os.replace(replaced, final)          # the previous one, back under its name
            shutil.rmtree(partial, ignore_errors=True)
            raise _write_error(err, checkpoint_dir, f"complete checkpoint {tag}") from err
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        for stale in checkpoint_dir.iterdir():   # left by killed runs
            if stale.name.startswith(_STALE) and stale != partial:
                shutil.rmtree(stale, ignore_errors=True)
        for old in complete_checkpoints(checkpoint_dir)[:-keep]:
            _remove(old)
    _barrier()
    return final
