"""A stale ``ray_current_cluster`` file on the host does not capture our local runs.

``ray start`` and Ray's test ``Cluster`` write the GCS address to
``$TMPDIR/ray/ray_current_cluster``, and a plain ``ray.init()`` attaches to it even when that
cluster is long gone (CI failed this way: every local run then hung on a dead GCS address or
refused ``num_cpus``). The test plants such a file in a private TMPDIR and starts Ray the way
training and the evaluator do (``utils.ray_address``, docs/design.md §6).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

SCRIPT = textwrap.dedent(
    """
    import ray
    from mtrec_dist.utils import ray_address

    try:  # what plain ray.init() does with the stale file: attach to it
        ray.init(num_cpus=1, include_dashboard=False)
        print("plain: started")
    except ValueError as e:
        print("plain:", "existing cluster" in str(e))
    print("address:", ray_address())
    ray.init(address=ray_address(), num_cpus=1, include_dashboard=False, log_to_driver=False)
    print("cpus:", ray.cluster_resources()["CPU"])
    print("session:", ray.get_runtime_context().gcs_address != "127.0.0.1:1")
    ray.shutdown()
    """
)


def test_a_stale_cluster_address_file_is_ignored_without_ray_address():
    tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live here
    try:
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # nothing listens
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
        env.update(TMPDIR=str(tmp), RAY_USAGE_STATS_ENABLED="0")
        p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                           text=True, timeout=240)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        lines = p.stdout.splitlines()
        assert lines == ["plain: True", "address: local", "cpus: 1.0", "session: True"], p.stdout
        sessions = [d.name for d in (tmp / "ray").iterdir() if d.name.startswith("session_")]
        assert sessions, "the new local Ray keeps its session under the private TMPDIR"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_address_follows_the_environment(monkeypatch):
    from mtrec_dist.utils import ray_address

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert ray_address() == "10.0.0.7:6379"
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert ray_address() == "local"
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_address() == "local"
