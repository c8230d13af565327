"""User errors: what the command line reports as one line, without a traceback.

A user error is a problem with what the user gave or has (a config value, a file, a shard, a
teacher directory, a checkpoint, a server, the disk) whose message names it and says the fix.
Every such error derives from `ColldError`: `ConfigError`, `DataError` (shards, shard indexes,
caches; `RemoteReadError` for URLs), `TeacherError` and `TeacherFilesError` (teacher
directories), the checkpoint errors of `colld_ds.checkpoint` and `colld_ds.trained`,
`ShardWriteError` and `RunFailedError`. Anything else is a bug or an unforeseen failure and keeps
its traceback. `run_command` prints a user error as `<prog>: error: <message>` and exits 1; with
`--verbose` anywhere on the command line or `COLLD_VERBOSE=1` (also reaching every rank through
launch.sh) it raises it with the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

VERBOSE_ENV = "COLLD_VERBOSE"


class ColldError(Exception):
    """A user error (module docstring): its message names the file or field and the fix."""


class DataError(ColldError, ValueError):
    """Shards, shard indexes or teacher caches that cannot be used as they are."""


class TeacherError(ColldError, ValueError):
    """A teacher directory, or the layers asked of it, that colld cannot use."""


class TeacherFilesError(ColldError, FileNotFoundError):
    """A teacher directory without the files a Hugging Face model directory holds."""


def verbose() -> bool:
    """Whether user errors show their traceback (`--verbose` or `COLLD_VERBOSE=1`)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def run_command(command: Callable[[], object], prog: str) -> None:
    """Run a command-line entry point; a `ColldError` exits 1 printing `<prog>: error: message`
    alone (module docstring). `--verbose` is taken out of `sys.argv` and set as
    `COLLD_VERBOSE=1`, so processes the command starts (ranks, runs of compare) inherit it."""
    if "--verbose" in sys.argv[1:]:
        sys.argv = [arg for arg in sys.argv if arg != "--verbose"]
        os.environ[VERBOSE_ENV] = "1"
    try:
        command()
    except ColldError as error:
        if verbose():
            raise
        kind = "config error" if type(error).__name__ == "ConfigError" else "error"
        # one write, newline included: ranks sharing a stderr (launch.sh) keep a line each,
        # where SystemExit(message) writes the message and its newline apart
        sys.stderr.write(f"{prog}: {kind}: {error}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
