"""``ray job submit`` of launch/train.py to a real ``ray start --head`` cluster with token auth.

The test starts its own head node on loopback with a private HOME and an explicit token, and
stops it by the process ids it started (never ``ray stop``, which would hit other clusters).
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture
def cluster():
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
    gcs, dash = _free_port(), _free_port()
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            f"--temp-dir={tmp}/ray",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{dash}", "tmp": Path(tmp)}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_under(f"{tmp}/ray"):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        shutil.rmtree(tmp, ignore_errors=True)


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
