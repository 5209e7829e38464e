"""A node lost mid-run is survived (issue 24, docs/design.md §6).

Ray's ``cluster_utils.Cluster`` on this machine, as Ray Train's own fault-tolerance tests do:
a head without CPUs and three one-CPU nodes, so the two workers (one CPU each) run on separate
nodes and one node is spare. Once the step-4 checkpoint is complete, the node of one worker is
removed (its raylet and everything under it killed); with ``trainer.max_failures=1`` Ray Train
restarts the group on the survivor and the spare, from the newest complete checkpoint. The
oracle is an uninterrupted run on the same cluster: same per-step losses (each step logged
once) and the same final weights, bit for bit, with the default dropout.

Then, on the two nodes left (no spare), losing a worker's node again stops the run with one
clear error once ``trainer.timeout_s`` has passed without the resources for a restart (Ray
Train's default is to wait for them forever, 60 s at a time), and the newest complete
checkpoint is intact for a ``--resume`` on a repaired cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
STEPS = 16
LOSE_AT = 4  # checkpoint after which a worker's node is removed


def _cfg(tiny_data: Path, run_dir: Path):
    from mtrec_dist.config import load_config

    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.root={tiny_data}",
            f"run_dir={run_dir}",
            "trainer.num_workers=2",
            f"trainer.max_steps={STEPS}",
            "trainer.checkpoint_every=4",
            "trainer.keep_checkpoints=2",
            "trainer.log_every=4",
            "trainer.max_failures=1",
            "trainer.timeout_s=30",
        ],
    )


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs) + 3 one-CPU nodes on loopback; every process stopped by the Cluster,
    which holds their handles. Ray turns a loopback address into the host's own IP unless
    multi-node clusters are declared local-only (its Windows/macOS switch), for this process
    and the nodes it starts."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    mp = pytest.MonkeyPatch()
    mp.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    lo = {"node_ip_address": "127.0.0.1"}
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **lo}
    )
    try:
        for _ in range(3):
            c.add_node(num_cpus=1, **lo)
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        mp.undo()


def _children(ppid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == ppid and b"RayTrainWorker" in cmd:
                out.append(int(entry.name))
    return out


def _lose_a_worker_node(cluster, run_dir: Path, done: threading.Event, lost: list) -> None:
    """Once checkpoint LOSE_AT is complete, remove the node running a Ray Train worker."""
    from ray._private import ray_constants

    from mtrec_dist.train.checkpoint import COMPLETE, checkpoint_folder, scan

    marker = checkpoint_folder(run_dir, LOSE_AT) / COMPLETE
    while not done.is_set():
        if marker.is_file():
            for node in list(cluster.worker_nodes):
                raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
                workers = _children(raylet)
                if workers:
                    cluster.remove_node(node, allow_graceful=False)
                    # a lost machine takes its processes with it at once; a worker orphaned by
                    # its raylet's death otherwise trains on until it notices (seconds on a
                    # loaded machine: enough to finish the run before the node "went")
                    for pid in workers:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    lost.append(int(scan(run_dir)[0][-1].name[5:]))
                    return
        time.sleep(0.005)


def _losses(run_dir: Path) -> list[tuple[int, dict]]:
    recs = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], {k: v for k, v in r.items() if k.startswith("loss/")}) for r in recs]


def test_a_lost_node_is_survived_from_the_newest_checkpoint(cluster, tiny_data, tmp_path):
    from mtrec_dist.train.launch import run_training

    straight = tmp_path / "straight"
    run_training(_cfg(tiny_data, straight))
    run_dir = tmp_path / "lost"
    done, lost = threading.Event(), []
    watcher = threading.Thread(target=_lose_a_worker_node, args=(cluster, run_dir, done, lost))
    watcher.start()
    try:
        run_training(_cfg(tiny_data, run_dir))
    finally:
        done.set()
        watcher.join()
    assert lost and LOSE_AT <= lost[0] < STEPS, lost  # a node went mid-run
    assert len(cluster.worker_nodes) == 2
    got, want = _losses(run_dir), _losses(straight)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert got == want
    a = load_file(str(straight / "export" / "model.safetensors"))
    b = load_file(str(run_dir / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_a_spare_node_the_run_stops_with_a_clear_error(cluster, tiny_data, tmp_path):
    from mtrec_dist.train.checkpoint import newest_complete, read_state
    from mtrec_dist.train.launch import TrainingFailed, run_training

    while len(cluster.worker_nodes) > 2:  # one CPU per worker, none to spare
        cluster.remove_node(next(iter(cluster.worker_nodes)))
    run_dir = tmp_path / "nospare"
    done, lost = threading.Event(), []
    watcher = threading.Thread(target=_lose_a_worker_node, args=(cluster, run_dir, done, lost))
    watcher.start()
    try:
        with pytest.raises(TrainingFailed) as e:
            run_training(_cfg(tiny_data, run_dir))
    finally:
        done.set()
        watcher.join()
    assert lost, "no node was removed"
    msg = str(e.value)
    assert msg.startswith(
        "training failed on Ray Train's controller: WorkerGroupStartupTimeoutError: The worker "
        "group startup timed out after 30.0 seconds waiting for 2 workers."
    ), msg
    assert msg.endswith(f"(full log: {run_dir / 'logs' / 'train_error.log'})")
    # the run did not end (no export), and its newest complete checkpoint is readable (the
    # lost node's worker may finish a step or two before Ray notices it is cut off)
    step = read_state(newest_complete(run_dir))["position"]["step"]
    assert lost[0] <= step < STEPS and not (run_dir / "export").exists()
