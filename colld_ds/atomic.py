"""Atomic file writes: a reader (or a killed job) never sees a half-written report or config."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary path)``, then rename it to ``path`` (the temporary is ``.<name>.tmp``
    beside it, so the rename stays on one file system)."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """``path.write_text(text)``, atomically."""
    return write_atomic(path, lambda temporary: temporary.write_text(text))
