"""The `colld` entry point: --help of `train` and `prep`, and the README's commands."""

import dataclasses
import inspect
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from colld_ds import cli
from colld_ds.config import TrainConfig
from colld_ds.data_prep.cli import DataPrep

REPO = Path(__file__).resolve().parent.parent


def colld(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PAGER="cat")
    return subprocess.run([sys.executable, "-m", "colld_ds.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def config_flags() -> list[str]:
    """``section.field`` of every config field, from the dataclasses."""
    hints = typing.get_type_hints(TrainConfig)
    return [f"{section.name}.{item.name}" for section in dataclasses.fields(TrainConfig)
            for item in dataclasses.fields(hints[section.name])]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_prints_usage_and_every_config_field(flag):
    done = colld("train", flag)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "config error" not in done.stdout + done.stderr
    assert inspect.getdoc(cli.train).splitlines()[0] in done.stdout
    missing = [name for name in config_flags() if f"--{name}:" not in done.stdout]
    assert not missing, done.stdout


def test_prep_help_lists_its_commands():
    done = colld("prep", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    commands = [name for name in vars(DataPrep) if not name.startswith("_")]
    assert "make_shards" in commands
    missing = [name for name in commands if name not in done.stdout + done.stderr]
    assert not missing, done.stdout + done.stderr


def readme_commands() -> list[list[str]]:
    """The ``colld ...`` command lines of README.md's bash blocks, as argument lists after
    ``colld`` (continuation lines joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        for start, word in enumerate(words):
            if word.endswith("/colld") or word == "colld":
                commands.append(words[start + 1:])
                break
    return commands


def test_readme_commands_use_only_flags_the_commands_take():
    commands = readme_commands()
    assert any(words[:2] == ["prep", "make_shards"] for words in commands)
    fields = set(config_flags())
    for words in commands:
        if words[0] == "prep":
            function, flags = getattr(DataPrep(), words[1].replace("-", "_")), words[2:]
        else:
            function, flags = getattr(cli, words[0]), words[1:]
        parameters = inspect.signature(function).parameters
        takes_config = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        for flag in (word[2:].split("=")[0] for word in flags if word.startswith("--")):
            known = (flag in parameters or flag.removeprefix("no") in parameters
                     or (takes_config and flag in fields))
            assert known, f"README: colld {' '.join(words)}: --{flag} is not a parameter"
