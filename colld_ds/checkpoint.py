"""Checkpoints that are complete or invisible.

DeepSpeed writes each checkpoint under a temporary tag (``.partial-step00000100``); once every
rank has written its part, the first process of each node marks it complete and renames it to
``step00000100``. ``--run.resume auto`` only ever considers complete, renamed checkpoints, so a
run killed while saving resumes from the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

COMPLETE_MARKER = "complete.json"
_TAG = re.compile(r"^step(\d{8})$")


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints under ``checkpoint_dir``, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [path for path in checkpoint_dir.iterdir()
             if _TAG.match(path.name) and (path / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda path: path.name)


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """``none`` -> None; ``auto`` -> the latest complete checkpoint or None; else that path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(
            f"run.resume: {path} is not a complete checkpoint (no {COMPLETE_MARKER}); "
            f"complete ones in {checkpoint_dir}: "
            f"{[p.name for p in complete_checkpoints(checkpoint_dir)] or 'none'}")
    return path


def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict[str, Any],
                    keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    tag = checkpoint_tag(step)
    partial = checkpoint_dir / f".partial-{tag}"
    final = checkpoint_dir / tag
    engine.save_checkpoint(str(checkpoint_dir), tag=partial.name, client_state=client_state,
                           save_latest=False)
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and partial.is_dir():
        marker = partial / COMPLETE_MARKER
        marker.write_text(json.dumps({"step": step, "time": time.time()}))
        if final.exists():        # a resumed run saving the same step again
            shutil.rmtree(final)
        try:
            os.replace(partial, final)
        except FileNotFoundError:  # another node renamed it first on a shared file system
            pass
        for old in complete_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final
