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
"""

from __future__ import annotations

import errno as errno_codes
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

COMPLETE_MARKER = "complete.json"
_TAG = re.compile(r"^step(\d{8})$")
_STALE = (".partial-step", ".deleting-step", ".replaced-step")
# how torch.save reports a full disk or a refused write: RuntimeError, not OSError
_WRITE_FAILURE = re.compile(r"PytorchStreamWriter|file write failed|No space left|"
                            r"Permission denied|Read-only file system|Disk quota")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous complete ones are intact."""


class CheckpointLoadError(RuntimeError):
    """No candidate checkpoint could be loaded on every rank."""


class CheckpointFallbackWarning(UserWarning):
    """A checkpoint could not be loaded and was skipped for an older one."""


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
    raises CheckpointLoadError when none could be loaded."""
    if _distributed():      # every rank walks the same list, so the collectives match
        shared = [[str(path) for path in candidates]]
        dist.broadcast_object_list(shared, src=0)
        candidates = [Path(path) for path in shared[0]]
    if not candidates:
        return None
    errors = []
    for path in candidates:
        error = None
        client_state: Any = None
        try:
            verify_checkpoint(path)
            load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
            if load_path is None or not isinstance(client_state, dict) \
                    or "step" not in client_state:
                error = "DeepSpeed found no loadable model states (files missing?)"
        except Exception as err:       # corrupt pickles raise anything: skip them all alike
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
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and partial.is_dir():
        replaced = None
        try:
            marker = {"step": step, "time": time.time(), "files": _file_sizes(partial)}
            (partial / COMPLETE_MARKER).write_text(json.dumps(marker))
            if final.exists():        # a resumed run saving the same step again
                replaced = final.with_name(f".replaced-{tag}")
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            try:
                os.replace(partial, final)
            except FileNotFoundError:  # another node renamed it first on a shared file system
                pass
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
