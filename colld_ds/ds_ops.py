"""Where DeepSpeed builds its just-in-time ops, and a guard against a build lock left behind.

On a CPU machine ``deepspeed.init_distributed`` compiles a shared-memory all-reduce op
(``ShareMemCommBuilder``, about 40 s on 2 cores) with ``torch.utils.cpp_extension``. Two things
in torch's way of doing it hurt us, and ``prepare_op_builds`` mends both before init:

- The build goes to ``~/.cache/torch_extensions``, shared by every environment on the machine;
  its build file names the environment's torch headers, so two virtual environments (a checkout
  and a fresh clone of it) rebuild the op in turn. When the environment is writable, colld
  builds in ``<environment>/torch_extensions`` instead (``TORCH_EXTENSIONS_DIR``, when set, wins).
- The build holds a ``lock`` file in the op's folder, and every later start waits while it
  exists, with no time limit and no message (``torch.utils.file_baton.FileBaton.wait``). A build
  that is killed (Ctrl-C at start-up, a test timeout) leaves the lock, and every later run hangs.
  colld waits while a lock is younger than ``STALE_AFTER_S`` (a build in progress: another rank
  or run), and past that raises ``StaleBuildLockError`` naming the file to delete.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from deepspeed.accelerator import get_accelerator

from colld_ds.errors import ColldError

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
STALE_AFTER_S = 600.0       # a build of the op takes ~40 s on 2 cores; ten minutes is no build


class StaleBuildLockError(ColldError, RuntimeError):
    """A JIT-build lock file older than any build (module docstring)."""


def use_environment_build_dir() -> Path | None:
    """Set ``TORCH_EXTENSIONS_DIR`` to ``<sys.prefix>/torch_extensions`` unless it is set or the
    environment is not writable (then torch's default stays). Returns the folder in use, or
    None for torch's default."""
    if EXTENSIONS_ENV not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ[EXTENSIONS_ENV] = str(Path(sys.prefix) / "torch_extensions")
    return Path(os.environ[EXTENSIONS_ENV]) if EXTENSIONS_ENV in os.environ else None


def wait_for_build_lock(build_dir: Path, stale_after_s: float = STALE_AFTER_S,
                        poll_s: float = 0.5) -> None:
    """Return once ``build_dir/lock`` is gone; raise ``StaleBuildLockError`` when it is (or
    becomes) older than ``stale_after_s``."""
    lock = build_dir / "lock"
    while True:
        try:
            age_s = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age_s > stale_after_s:
            raise StaleBuildLockError(
                f"{lock}: a build lock {age_s / 60:.0f} min old, left by an interrupted build of "
                f"DeepSpeed's {build_dir.name} op; torch would wait on it forever. If no other "
                f"colld or DeepSpeed process is starting on this machine, delete it (rm {lock}) "
                "and start again")
        time.sleep(poll_s)


def prepare_op_builds() -> None:
    """Before ``deepspeed.init_distributed``: build in the environment's folder, and wait for
    (or refuse) the lock of the op init builds on this accelerator, if it builds one."""
    build_root = use_environment_build_dir()
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and build_root is not None:
        wait_for_build_lock(build_root / builder.NAME)
