"""``ray job submit`` of launch/train.py to a real ``ray start --head`` cluster with token auth.

The test starts its own head node on loopback with a private HOME and an explicit token, on
free ports for every listener Ray opens (a second Ray on the host holds the defaults, such as
the dashboard agent's 52365: the test makes sure one does), and stops what it started by
process id (never ``ray stop``, which would hit other clusters).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _pids_under(marker: str) -> set[int]:
    """Processes whose command line names our temp dir, plus all their descendants."""
    parent: dict[int, int] = {}
    roots: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parent[int(d.name)] = ppid
        if marker in cmd:
            roots.add(int(d.name))
    found = set(roots)
    grew = True
    while grew:
        kids = {p for p, pp in parent.items() if pp in found} - found
        found |= kids
        grew = bool(kids)
    return found


# The fixed-default ports a head node listens on, as `ray start` flags (the node and object
# managers pick free ports themselves; worker ports come from a range).
PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--runtime-env-agent-port",
    "--dashboard-agent-grpc-port",
    "--dashboard-agent-listen-port",
    "--metrics-export-port",
    "--ray-client-server-port",
)
AGENT_DEFAULT_PORT = 52365  # Ray's default dashboard agent port, taken by the other Ray


def _free_ports() -> dict[str, int]:
    socks = []
    try:  # hold them all open while choosing, so no two flags get the same port
        for _ in PORT_FLAGS:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return {f: s.getsockname()[1] for f, s in zip(PORT_FLAGS, socks)}
    finally:
        for s in socks:
            s.close()


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _start_head(tmp: str, env: dict, ports: dict[str, int], *extra: str) -> None:
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            *[f"{flag}={port}" for flag, port in ports.items()],
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            f"--temp-dir={tmp}/ray",
            "--disable-usage-stats",
            *extra,
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )


def _stop(tmp: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_under(f"{tmp}/ray"):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def other_ray():
    """Another Ray on this host holding the dashboard agent's default port (started here
    unless one already holds it)."""
    tmp = tempfile.mkdtemp(prefix="ro", dir="/tmp")
    if not _port_taken(AGENT_DEFAULT_PORT):
        home = Path(tmp) / "home"
        home.mkdir()
        env = dict(
            os.environ, HOME=str(home), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
        )
        ports = {**_free_ports(), "--dashboard-agent-listen-port": AGENT_DEFAULT_PORT}
        _start_head(tmp, env, ports, "--include-dashboard=false")
    assert _port_taken(AGENT_DEFAULT_PORT)
    try:
        yield
    finally:
        _stop(tmp)


@pytest.fixture
def cluster(other_ray):
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length cap
    home = Path(tmp) / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    env = dict(
        os.environ,
        HOME=str(home),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        MTREC_QUIET="1",
        # the job's `python` must be this environment's, as in a real cluster image
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    ports = _free_ports()
    _start_head(tmp, env, ports, "--include-dashboard=true")
    try:
        address = f"http://127.0.0.1:{ports['--dashboard-port']}"
        yield {"env": env, "address": address, "tmp": Path(tmp)}
    finally:
        _stop(tmp)


def test_job_submit_with_token_auth_trains_and_writes_tensorboard(cluster, tiny_data):
    env, address = cluster["env"], cluster["address"]
    # without the token the jobs API refuses
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["HOME"] = str(cluster["tmp"])  # no ~/.ray/auth_token there either
    denied = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", address],
        env=no_token,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert denied.returncode != 0
    assert "auth" in (denied.stdout + denied.stderr).lower()

    run_dir = cluster["tmp"] / "run"
    sub = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "launch/train.py",
            "--config",
            "configs/tiny.yaml",
            f"data.root={tiny_data}",
            f"run_dir={run_dir}",
            "trainer.max_steps=4",
            "trainer.num_workers=2",
            "trainer.checkpoint_every=2",
            "trainer.timeout_s=60",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    assert "succeeded" in (sub.stdout + sub.stderr).lower()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss/main")] == [1, 2, 3, 4]
    assert len(ea.Scalars("grad/cos_before")) == 4
    assert (run_dir / "export" / "model.safetensors").is_file()
