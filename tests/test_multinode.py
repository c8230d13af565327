"""Two nodes through DeepSpeed's own multi-node launcher: ``launch.sh --hostfile`` -> DeepSpeed's
runner -> pdsh -> ssh -> an sshd this module starts on 127.0.0.1 and 127.0.0.2 with keys it
generates. Each "node" runs one CPU rank (ZeRO-2, gloo) in a fresh ssh login, so everything the
ranks need must travel the way it does on a cluster: PYTHON* variables by DeepSpeed's runner,
the rest through ``.deepspeed_env`` in the directory the job is launched from.

OpenSSH reads ``~/.ssh/config`` from the password database's home directory, never from $HOME,
so the module's ssh config reaches ssh through an ``ssh`` on PATH that adds ``-F`` (the runner's
own ssh check and pdsh both run ``ssh`` from PATH); on a cluster that is ``~/.ssh/config``.

Never send SIGINT/SIGTERM to the launcher here: DeepSpeed's runner answers them with ``pkill -f``
on every host, matching any DeepSpeed launch of this Python. Cleanup kills by pid: the launcher's
process group, and everything under this module's sshd.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from colld_ds.checkpoint import complete_checkpoints
from helpers import CONFIG, REPO, kill_group, overrides

SSHD = shutil.which("sshd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        SSHD is None or not all(map(shutil.which, ("ssh", "ssh-keygen", "pdsh"))),
        reason="needs openssh-server, openssh-client and pdsh "
               "(apt-get install openssh-server pdsh, as scripts/setup.sh --tests does as root)"),
]
MAX_STEPS = 24
SAVE_EVERY = 3
HOSTS = {"node1": "127.0.0.1", "node2": "127.0.0.2"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _kill(processes: list[psutil.Process]) -> None:
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """An sshd on 127.0.0.1 and 127.0.0.2 that lets this user in with a generated key, an ssh
    that reaches it as node1 and node2, and a job directory with the hostfile and
    .deepspeed_env: ``{"job", "hostfile", "env", "sshd"}``."""
    root = tmp_path_factory.mktemp("cluster")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)],
                       check=True)
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    port = _free_port()
    (root / "sshd_config").write_text("\n".join([
        f"Port {port}", *(f"ListenAddress {address}" for address in HOSTS.values()),
        f"HostKey {root / 'host_key'}", f"AuthorizedKeysFile {root / 'authorized_keys'}",
        f"PidFile {root / 'sshd.pid'}", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "StrictModes no", ""]))
    (root / "ssh_config").write_text("".join(
        f"Host {name}\n  HostName {address}\n" for name, address in HOSTS.items()) + "\n".join([
        "Host *", f"  Port {port}", f"  IdentityFile {root / 'user_key'}", "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {root / 'known_hosts'}", "  StrictHostKeyChecking accept-new",
        "  BatchMode yes", "  LogLevel ERROR", ""]))
    (root / "bin").mkdir()
    (root / "bin" / "ssh").write_text(
        f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root / "ssh_config"} "$@"\n')
    (root / "bin" / "ssh").chmod(0o755)
    if os.getuid() == 0:    # sshd started as root drops privileges into this empty directory
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    sshd = subprocess.Popen([SSHD, "-D", "-f", str(root / "sshd_config"),
                             "-E", str(root / "sshd.log")])
    job = root / "job"
    job.mkdir()
    (job / "hosts").write_text("".join(f"{name} slots=1\n" for name in HOSTS))
    (job / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\n")
    env = dict(os.environ, PATH=f"{root / 'bin'}:{os.environ['PATH']}",
               COLLD_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["ssh", "node2", "true"], env=env).returncode != 0:
            assert sshd.poll() is None, (root / "sshd.log").read_text()
            assert time.monotonic() < deadline, (root / "sshd.log").read_text()
            time.sleep(0.2)
        yield {"job": job, "hostfile": job / "hosts", "env": env, "sshd": sshd}
    finally:
        _kill(psutil.Process(sshd.pid).children(recursive=True))   # what the nodes still run
        sshd.terminate()
        sshd.wait()


def _command(cluster, assets, out_dir, nodes: bool, **extra) -> list[str]:
    """launch.sh over both nodes (``nodes``) or on this machine with 2 CPU ranks."""
    command = [str(REPO / "launch.sh")]
    if nodes:
        command += ["--hostfile", str(cluster["hostfile"]), "--master_addr", "127.0.0.1"]
    command += ["--config", str(CONFIG)]
    values = overrides(assets, out_dir, **{"optim.max_steps": MAX_STEPS,
                                           "run.save_every": SAVE_EVERY, **extra})
    for key, value in values.items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return command


def _rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _run(cluster, command, **env) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=dict(cluster["env"], COLLD_CPU_RANKS="2", **env),
                          cwd=cluster["job"], capture_output=True, text=True, timeout=300)


def _launch(cluster, assets, out_dir, nodes: bool, **extra) -> tuple[list[dict], str]:
    done = _run(cluster, _command(cluster, assets, out_dir, nodes, **extra))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _rows(out_dir), done.stdout + done.stderr


def _losses(rows) -> dict[int, float]:
    return {row["step"]: row["loss/total"] for row in rows}


def _ranks(cluster, out_dir) -> list[psutil.Process]:
    """The training processes of ``out_dir`` that the nodes run (not their loader workers)."""
    found = []
    for proc in psutil.Process(cluster["sshd"].pid).children(recursive=True):
        try:
            if ("colld_ds.cli" in proc.cmdline() and str(out_dir) in proc.cmdline()
                    and "RANK" in proc.environ() and "RANK" not in proc.parent().environ()):
                found.append(proc)
        except psutil.Error:          # a short-lived helper process that is already gone
            pass
    return found


@pytest.fixture(scope="module")
def one_node(cluster, train_assets):
    """1 node x 2 ranks: the losses every two-node run must reproduce."""
    rows, _ = _launch(cluster, train_assets, train_assets["root"] / "one-node", nodes=False)
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1))
    return _losses(rows)


def test_two_nodes_one_rank_each_match_one_node_two_ranks(cluster, train_assets, one_node):
    out_dir = train_assets["root"] / "two-nodes"
    rows, output = _launch(cluster, train_assets, out_dir, nodes=True)
    assert "pdsh -S -f 1024 -w node1,node2" in output, output[-3000:]   # the ssh path, not local
    assert "node1: [colld] 2 rank(s) on cpu" in output, output[-3000:]
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1)), output[-3000:]
    for step, loss in _losses(rows).items():
        assert loss == pytest.approx(one_node[step], rel=1e-5, abs=1e-6), step
    assert not _ranks(cluster, out_dir)


def test_a_node_rank_killed_then_resume_auto_matches_one_node(cluster, train_assets, one_node):
    out_dir = train_assets["root"] / "two-nodes-killed"
    launcher = subprocess.Popen(_command(cluster, train_assets, out_dir, nodes=True),
                                env=cluster["env"], cwd=cluster["job"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(complete_checkpoints(out_dir / "checkpoints")) < 2:
            assert launcher.poll() is None, launcher.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "not two checkpoints within 120 s"
            time.sleep(0.02)
        node2 = [p for p in _ranks(cluster, out_dir) if p.environ()["CROSS_RANK"] == "1"]
        assert [p.environ()["RANK"] for p in node2] == ["1"], node2
        node2[0].send_signal(signal.SIGKILL)
        output = launcher.communicate(timeout=60)[0].decode()
    finally:
        kill_group(launcher)
    assert launcher.returncode != 0, output[-3000:]
    deadline = time.monotonic() + 15      # node1's rank sees its peer gone and ends too
    while _ranks(cluster, out_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _ranks(cluster, out_dir), "a rank outlived the job"
    killed_at = _rows(out_dir)[-1]["step"]
    assert killed_at < MAX_STEPS, "the kill came too late"
    latest = complete_checkpoints(out_dir / "checkpoints")[-1]

    rows, output = _launch(cluster, train_assets, out_dir, nodes=True, **{"run.resume": "auto"})
    assert f"resuming from {latest}" in output, output[-3000:]
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1)), output[-3000:]
    for step, loss in _losses(rows).items():
        assert loss == pytest.approx(one_node[step], rel=1e-5, abs=1e-6), step


def test_colld_verbose_reaches_the_ranks_of_every_node(cluster, train_assets):
    """ssh carries no environment: launch.sh passes COLLD_VERBOSE on as --verbose."""
    out_dir = train_assets["root"] / "two-nodes-verbose"
    command = _command(cluster, train_assets, out_dir, nodes=True,
                       **{"data.train_shards": str(train_assets["root"] / "no-such-dir")})
    done = _run(cluster, command, COLLD_VERBOSE="1")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    for rank, node in enumerate(HOSTS):       # the traceback, from each node's rank
        for line in ("Traceback", "colld_ds.errors.DataError: no shards matched"):
            assert f"{node}: [rank{rank}]: {line}" in output, output[-3000:]
