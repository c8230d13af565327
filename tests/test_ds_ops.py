"""colld_ds.ds_ops: the environment's own build folder for DeepSpeed's JIT ops, and the build
lock guard (a lock left by a killed build made every later start hang forever)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from colld_ds import ds_ops
from colld_ds.ds_ops import StaleBuildLockError, use_environment_build_dir, wait_for_build_lock


def make_lock(build_dir, age_s: float):
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_no_lock_returns_at_once(tmp_path):
    started = time.monotonic()
    wait_for_build_lock(tmp_path / "deepspeed_shm_comm")
    assert time.monotonic() - started < 0.1


def test_old_lock_is_refused_naming_the_file_and_the_fix(tmp_path):
    lock = make_lock(tmp_path / "deepspeed_shm_comm", age_s=3600)
    with pytest.raises(StaleBuildLockError) as error:
        wait_for_build_lock(lock.parent)
    message = str(error.value)
    assert message.startswith(f"{lock}: a build lock 60 min old"), message
    assert f"rm {lock}" in message and "deepspeed_shm_comm op" in message
    assert lock.exists()                                    # nothing deleted behind the user


def test_lock_of_a_build_in_progress_is_waited_for(tmp_path):
    lock = make_lock(tmp_path / "op", age_s=0)
    threading.Timer(0.6, lock.unlink).start()               # the build ends
    started = time.monotonic()
    wait_for_build_lock(lock.parent, stale_after_s=30, poll_s=0.05)
    assert 0.5 < time.monotonic() - started < 5


def test_lock_that_outlives_any_build_is_refused(tmp_path):
    lock = make_lock(tmp_path / "op", age_s=0)
    started = time.monotonic()
    with pytest.raises(StaleBuildLockError):
        wait_for_build_lock(lock.parent, stale_after_s=0.5, poll_s=0.05)
    assert 0.5 <= time.monotonic() - started < 5


def test_build_folder_is_the_environments_unless_set_or_read_only(tmp_path, monkeypatch):
    monkeypatch.delenv(ds_ops.EXTENSIONS_ENV, raising=False)
    monkeypatch.setattr(ds_ops.sys, "prefix", str(tmp_path / "venv"))
    (tmp_path / "venv").mkdir()
    assert use_environment_build_dir() == tmp_path / "venv" / "torch_extensions"
    assert os.environ[ds_ops.EXTENSIONS_ENV] == str(tmp_path / "venv" / "torch_extensions")

    monkeypatch.setenv(ds_ops.EXTENSIONS_ENV, str(tmp_path / "mine"))
    assert use_environment_build_dir() == tmp_path / "mine"

    monkeypatch.delenv(ds_ops.EXTENSIONS_ENV)
    monkeypatch.setattr(ds_ops.os, "access", lambda path, mode: False)   # root writes anywhere
    assert use_environment_build_dir() is None
    assert ds_ops.EXTENSIONS_ENV not in os.environ
