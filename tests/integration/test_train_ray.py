"""Distributed training end to end: Ray Train + DeepSpeed ZeRO-2, 2 CPU workers, tiny BERT.

One uninterrupted run is the oracle for three claims:
- it equals the single-process reference trainer on the same global batches (N workers == 1);
- a worker killed mid-run is replaced, training resumes from the last checkpoint with the data
  stream at the same position, and ends with exactly the same weights and per-step losses;
- an explicit ``--resume`` after a crashed run does the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WORLD = 2
STEPS = 30  # crosses an epoch boundary: 437 tiny clicks / (8 x 2) = 27 batches per epoch
ARGS = [
    "trainer.num_workers=2",
    f"trainer.max_steps={STEPS}",
    "trainer.epochs=2",
    "trainer.checkpoint_every=10",
    "trainer.keep_checkpoints=2",
    "trainer.log_every=10",
    "trainer.eval_every=15",  # periodic dev metrics through the evaluator
    "trainer.timeout_s=60",
    "model.dropout=0.0",  # deterministic forward passes, so runs can be compared exactly
    # Adam divides by |g| + eps: with 1e-8, float noise in near-zero gradient entries flips whole
    # updates, so the cross-implementation comparison uses a larger eps (as the ZeRO tests do).
    "trainer.adam_eps=1e-3",
    "data.loader_workers=0",
]


@pytest.fixture(scope="module")
def zero2(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("ds") / "zero2.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    return str(p)


def _cfg(tiny_data: Path, run_dir: Path, zero2: str, *extra: str):
    from mtrec_dist.config import load_config

    repo = Path(__file__).resolve().parents[2]
    return load_config(
        repo / "configs" / "tiny.yaml",
        [f"data.root={tiny_data}", f"run_dir={run_dir}", f"deepspeed={zero2}", *ARGS, *extra],
    )


def _losses(run_dir: Path) -> dict[int, dict]:
    """Last logged record of every step (a restarted run logs replayed steps again)."""
    recs = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["step"]] = {k: v for k, v in r.items() if k.startswith("loss/")}
    return recs


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tiny_data, tmp_path_factory, zero2):
    from mtrec_dist.train.launch import run_training

    run_dir = tmp_path_factory.mktemp("run") / "a"
    run_training(_cfg(tiny_data, run_dir, zero2))
    return run_dir


def _reference(cfg) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """The single-process reference on the same global batches (both ranks' micro-batches):
    its final weights and each step's task losses (the mean over the global batch)."""
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.data.stream import loader_for
    from mtrec_dist.models.registry import build_model
    from mtrec_dist.train.local import reference_step
    from mtrec_dist.train.optim import build_optimizer, build_scheduler

    t = cfg.trainer
    torch.manual_seed(t.seed)
    model = build_model(cfg, load_manifest(cfg.prepared_dir))
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, STEPS, t.warmup_ratio)
    step, losses = 0, []
    for epoch in range(t.epochs):
        loaders = [loader_for(cfg, rank=r, world_size=WORLD, epoch=epoch) for r in range(WORLD)]
        for batches in zip(*loaders):
            stats = reference_step(
                model,
                list(batches),
                cfg.model.groups,
                t.surgery,
                t.surgery_scope,
                opt,
                seed=t.seed,
                step=step,
            )
            sched.step()
            losses.append(stats["losses"])
            step += 1
            if step == STEPS:
                return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses
    raise AssertionError("ran out of batches")


def test_two_workers_equal_single_process_reference(uninterrupted, tiny_data, zero2):
    cfg = _cfg(tiny_data, uninterrupted, zero2)
    ref, ref_losses = _reference(cfg)
    got = _weights(uninterrupted)
    assert set(got) == set(ref)
    worst = max((got[k] - ref[k].float()).abs().max().item() for k in ref)
    assert worst < 1e-4, worst
    # and training moved the weights far more than that
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.models.registry import build_model

    torch.manual_seed(cfg.trainer.seed)
    init = build_model(cfg, load_manifest(cfg.prepared_dir)).state_dict()
    moved = max((got[k] - init[k].float()).abs().max().item() for k in init)
    assert moved > 100 * worst
    # the logged losses are the global batch's (mean over both ranks), as the reference's
    logged = _losses(uninterrupted)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, want in enumerate(ref_losses, start=1):
        for k, v in want.items():
            assert abs(logged[step][f"loss/{k}"] - v) <= 1e-4 * max(1.0, abs(v)), (step, k)


def test_top_layer_over_the_layer_cache_equals_the_reference(
    ray_session, tiny_data, tmp_path, zero2
):
    """model.train_layers=1 through run_training: the driver builds the frozen layer's per-news
    cache, both workers read it (global de-duplication, ZeRO-2), and the run ends with the
    weights and losses of the single-process reference, which computes that layer instead."""
    from mtrec_dist.data.batch import NewsTable
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.models import layer_cache
    from mtrec_dist.models.registry import build_model
    from mtrec_dist.train.launch import run_training

    extra = ("model.train_layers=1", "trainer.checkpoint_every=0", "trainer.eval_every=0")
    run_training(_cfg(tiny_data, tmp_path / "top", zero2, *extra))
    cfg = _cfg(tiny_data, tmp_path / "top", zero2, *extra)
    ref, ref_losses = _reference(cfg)
    got = _weights(tmp_path / "top")
    worst = max((got[k] - ref[k].float()).abs().max().item() for k in ref)
    assert worst < 1e-4, worst
    logged = _losses(tmp_path / "top")
    for step, want in enumerate(ref_losses, start=1):
        for k, v in want.items():
            assert abs(logged[step][f"loss/{k}"] - v) <= 1e-4 * max(1.0, abs(v)), (step, k)
    torch.manual_seed(cfg.trainer.seed)
    init = build_model(cfg, load_manifest(cfg.prepared_dir))
    frozen = "encoder.bert.encoder.layer.0.output.dense.weight"
    top = "encoder.bert.encoder.layer.1.output.dense.weight"
    assert torch.equal(got[frozen], init.state_dict()[frozen])  # the cached layer stayed
    assert (got[top] - init.state_dict()[top]).abs().max() > 100 * worst  # the top one trained
    key = layer_cache.cache_key(init.encoder.bert, 1, NewsTable(cfg.prepared_dir).tokens)
    assert (layer_cache.cache_folder(cfg.prepared_dir, key) / "COMPLETE").is_file()


def test_logged_title_counts_are_those_of_the_global_exchange(uninterrupted, tiny_data, zero2):
    """data.dedup=auto is global here (MTRec, 2 workers): every step logs the titles the
    encoders ran on, W x ceil(U_g / W), and U_g, the distinct news of both ranks' micro-batches,
    counted here on the loader's own id streams."""
    import numpy as np

    from mtrec_dist.data.stream import loader_for

    cfg = _cfg(tiny_data, uninterrupted, zero2)
    want = []
    for epoch in range(cfg.trainer.epochs):
        loaders = [loader_for(cfg, rank=r, world_size=WORLD, epoch=epoch) for r in range(WORLD)]
        for batches in zip(*loaders):
            n = np.unique(np.concatenate([b.news_rows.numpy() for b in batches])).size
            want.append((WORLD * -(-n // WORLD), n))
    recs = [json.loads(x) for x in (uninterrupted / "train_log.jsonl").read_text().splitlines()]
    got = [(int(r["titles/encoded"]), int(r["titles/global_distinct"])) for r in recs]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert got == want[:STEPS]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _ours(pid: int) -> bool:
    """True when ``pid`` descends from this test process (the local Ray it started): other
    sessions on the host run Ray Train workers too, and must never be hit."""
    me = os.getpid()
    while pid > 1:
        pid = _ppid(pid)
        if pid == me:
            return True
    return False


def _started_after(pid: int, t0_ticks: int) -> bool:
    """True when process ``pid`` started after ``t0_ticks`` (clock ticks since boot)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]) >= t0_ticks  # field 22 of stat: starttime
    except (OSError, ValueError, IndexError):
        return False


def now_ticks() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def train_workers(t0_ticks: int) -> list[int]:
    """Ray Train worker processes of this test process's Ray started after ``t0_ticks`` (idle
    workers of earlier runs, and other sessions' workers on the host, must not be hit)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    pids = [int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line]
    return [p for p in pids if _started_after(p, t0_ticks) and _ours(p)]


def _kill_a_worker_when(run_dir: Path, step: int, done: threading.Event, killed: list) -> None:
    """Watch train_log.jsonl; at ``step``, SIGKILL one of this run's Ray Train workers."""
    t0 = now_ticks()
    log = run_dir / "train_log.jsonl"
    while not done.is_set():
        if log.is_file() and any(
            json.loads(x)["step"] >= step for x in log.read_text().splitlines()
        ):
            pids = train_workers(t0)
            if pids:
                from mtrec_dist.train.launch import checkpoints_of

                os.kill(max(pids), signal.SIGKILL)
                killed.append(max(pids))
                newest = checkpoints_of(run_dir)  # complete ones when the worker died
                killed.append(int(newest[-1].name.split("_")[1]) if newest else 0)
                return
        time.sleep(0.02)


@contextlib.contextmanager
def _killing_a_worker_at(run_dir: Path, step: int) -> Iterator[list[int]]:
    """Run the body while a watcher SIGKILLs a worker at ``step``; yields [killed pid, step of
    the newest complete checkpoint at that moment]."""
    done, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_a_worker_when, args=(run_dir, step, done, killed))
    watcher.start()
    try:
        yield killed
    finally:
        done.set()
        watcher.join()


def test_killed_worker_is_replaced_and_resumes_exactly(uninterrupted, tiny_data, tmp_path, zero2):
    from mtrec_dist.train.launch import run_training

    run_dir = tmp_path / "b"
    with _killing_a_worker_at(run_dir, 13) as killed:
        run_training(_cfg(tiny_data, run_dir, zero2, "trainer.max_failures=1"))
    assert killed, "no worker was killed: the run ended before step 13"
    steps = [json.loads(x)["step"] for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    # Restarted from the newest complete checkpoint at the moment of the kill (step 10 unless
    # the worker ran 2 more steps first); the restarted worker cut the log back to that step,
    # so every step is logged once.
    assert killed[1] in (10, 15) and steps == list(range(1, STEPS + 1))
    assert _losses(run_dir) == _losses(uninterrupted)  # same samples, same order, same numbers
    a, b = _weights(uninterrupted), _weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_explicit_resume_after_a_crash(uninterrupted, tiny_data, tmp_path, zero2):
    from mtrec_dist.train.launch import checkpoints_of, run_training

    run_dir = tmp_path / "c"
    with _killing_a_worker_at(run_dir, 21) as killed:
        with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker death in its own type
            run_training(_cfg(tiny_data, run_dir, zero2, "trainer.max_failures=0"))
    assert killed and checkpoints_of(run_dir)
    # a fresh start refuses to overwrite the run; --resume continues it
    from mtrec_dist.config import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        run_training(_cfg(tiny_data, run_dir, zero2))
    run_training(_cfg(tiny_data, run_dir, zero2), resume=str(run_dir))
    assert _losses(run_dir) == _losses(uninterrupted)
    a, b = _weights(uninterrupted), _weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_to_fp32_reads_the_saved_checkpoint(uninterrupted):
    """DeepSpeed's own converter works on our checkpoints and agrees with the export."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mtrec_dist.train.checkpoint import DS_TAG
    from mtrec_dist.train.launch import checkpoints_of

    ckpts = checkpoints_of(uninterrupted)
    assert len(ckpts) == 2  # keep_checkpoints=2 of the 3 saved
    last = max(
        ckpts, key=lambda p: json.loads((p / "train_state.json").read_text())["position"]["step"]
    )
    assert json.loads((last / "train_state.json").read_text())["position"]["step"] == STEPS
    sd = get_fp32_state_dict_from_zero_checkpoint(str(last), tag=DS_TAG)
    got = _weights(uninterrupted)
    for k, v in sd.items():
        assert torch.equal(v.float(), got[k]), k


def test_tensorboard_events_and_cosine_plot(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(uninterrupted / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "loss/main",
        "loss/category",
        "loss/ner",
        "grad/cos_before",
        "grad/cos_after",
        "grad/conflict_rate",
        "lr",
        "throughput/samples_per_s",
        "throughput/titles_per_s",
    ):
        assert tag in tags, tag
    assert [e.step for e in ea.Scalars("loss/main")] == list(range(1, STEPS + 1))
    for m in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert [e.step for e in ea.Scalars(f"dev/{m}")] == [0, 15, 30], (
            m
        )  # the untrained model first
        assert all(0.0 < e.value <= 1.0 for e in ea.Scalars(f"dev/{m}"))
    # after MTRec surgery the two gradients never conflict
    assert all(e.value >= -1e-9 for e in ea.Scalars("grad/cos_after"))
    assert (uninterrupted / "cosine_trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
