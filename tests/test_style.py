"""The project's line length: no tracked ``.py`` or ``.sh`` line over 100 characters."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_LINE = 100                  # characters, the project's standard (README "Layout")


def tracked_sources() -> list[Path]:
    """The tracked ``.py`` and ``.sh`` files that exist in the working tree (skips without git)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and the repository's .git")
    listed = subprocess.run(["git", "ls-files", "-z", "--", "*.py", "*.sh"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"git ls-files failed: {listed.stderr.strip()}")
    names = [name for name in listed.stdout.split("\0") if name]
    return [REPO / name for name in names if (REPO / name).is_file()]


def long_lines(path: Path) -> list[str]:
    """``file:line: N characters`` for each line of ``path`` longer than ``MAX_LINE``."""
    lines = path.read_text(encoding="utf-8").split("\n")
    name = path.relative_to(REPO)
    return [f"{name}:{number}: {len(line)} characters"
            for number, line in enumerate(lines, 1) if len(line) > MAX_LINE]


def test_no_line_over_100_characters():
    sources = tracked_sources()
    assert sources, "git ls-files listed no .py or .sh file"
    too_long = [found for path in sources for found in long_lines(path)]
    listing = "\n".join(too_long)
    assert not too_long, f"{len(too_long)} lines over {MAX_LINE} characters:\n{listing}"
