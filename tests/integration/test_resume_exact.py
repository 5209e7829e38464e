"""Resume is exact for a step-dependent surgery across an epoch boundary with accumulation.

One Ray Train worker (ZeRO-1, tiny BERT) runs PCGrad over 3 gradient groups, whose visiting
order is drawn per optimizer step, with ``grad_accum=5`` not dividing the 56 micro-batches of
an epoch (11 steps per epoch, 1 micro-batch dropped) for 2 epochs. Rank 0 is SIGKILLed right
after the step-15 checkpoint is complete (mid second epoch); Ray restarts it. The oracle is the
single-process reference trainer ``train_local`` on the same config: same number of steps,
per-step PCGrad coefficients and final weights. The restart must resume from the newest
complete checkpoint at the moment of the kill.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

GROUPS3 = {"main": {"main": 1.0}, "category": {"category": 1.0}, "ner": {"ner": 1.0}}
ACCUM = 5
STEPS = 22  # 2 epochs x (56 micro-batches // 5)
KILL_AFTER = 15  # checkpoint step after which rank 0 dies (second epoch)


def _cfg(tiny_data: Path, run_dir: Path):
    from mtrec_dist.config import load_config

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(
        repo / "configs" / "tiny.yaml",
        [
            f"data.root={tiny_data}",
            f"run_dir={run_dir}",
            "trainer.num_workers=1",
            f"trainer.grad_accum={ACCUM}",
            "trainer.epochs=2",
            "trainer.max_steps=0",
            "trainer.checkpoint_every=5",
            "trainer.keep_checkpoints=2",
            "trainer.log_every=5",
            "trainer.surgery=pcgrad",
            "trainer.max_failures=1",
            "trainer.timeout_s=60",
            "trainer.seed=3",
            "model.dropout=0.0",
            # the NER scale this test's coefficient tolerance was calibrated with (eq. 8)
            "model.ner_reduction=sum",
            "trainer.adam_eps=1e-3",
            "data.loader_workers=0",
        ],
    )
    cfg.model.groups = GROUPS3
    return cfg


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _last_per_step(recs: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in recs}


def _kill_rank0_after(run_dir: Path, step: int, done: threading.Event, seen: list) -> None:
    """When checkpoint ``step`` is complete, SIGKILL this run's Ray Train worker; record the
    complete checkpoints on disk at that moment."""
    from mtrec_dist.train.checkpoint import COMPLETE, checkpoint_folder, scan
    from tests.integration.test_train_ray import now_ticks, train_workers

    t0 = now_ticks()
    marker = checkpoint_folder(run_dir, step) / COMPLETE
    while not done.is_set():
        if marker.is_file():
            pids = train_workers(t0)
            if pids:
                os.kill(max(pids), signal.SIGKILL)
                seen.append([p.name for p in scan(run_dir)[0]])
                return
        time.sleep(0.005)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "model.safetensors"))


def _coefs(recs: dict[int, dict]) -> dict[int, list[float]]:
    return {s: [r[f"grad/coef/{g}"] for g in GROUPS3] for s, r in recs.items()}


def test_pcgrad_three_groups_killed_after_checkpoint_resumes_exactly(tiny_data, tmp_path):
    """Uninterrupted run == killed-and-restarted run (bit for bit) ~= local reference."""
    import ray

    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.train.checkpoint import scan
    from mtrec_dist.train.launch import run_training
    from mtrec_dist.train.local import train_local
    from mtrec_dist.train.steps import step_plan

    cfg = _cfg(tiny_data, tmp_path)
    plan = step_plan(load_manifest(cfg.prepared_dir), 1, cfg.trainer)
    assert plan.batches_per_epoch % ACCUM and plan.total_steps == STEPS

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        straight = tmp_path / "straight"
        run_training(_cfg(tiny_data, straight))
        run_dir = tmp_path / "killed"
        done, seen = threading.Event(), []
        watcher = threading.Thread(target=_kill_rank0_after, args=(run_dir, KILL_AFTER, done, seen))
        watcher.start()
        try:
            run_training(_cfg(tiny_data, run_dir))
        finally:
            done.set()
            watcher.join()
    finally:
        ray.shutdown()
    assert seen, "rank 0 was never killed"
    newest_at_kill = int(seen[0][-1].split("_")[1])
    steps = [r["step"] for r in _records(run_dir)]
    # resumed from the newest complete checkpoint (KILL_AFTER or a later one), whose step the
    # restarted worker cut the log back to: every step logged once
    assert newest_at_kill >= KILL_AFTER and steps == list(range(1, STEPS + 1)), steps

    # the restarted run redraws no PCGrad order: identical coefficients, losses and weights
    a, b = _last_per_step(_records(straight)), _last_per_step(_records(run_dir))
    assert _coefs(a) == _coefs(b)
    assert [a[s]["loss/main"] for s in a] == [b[s]["loss/main"] for s in a]
    wa, wb = _weights(straight), _weights(run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # PCGrad changed the combination on some steps, so its order could matter
    assert any(abs(c - 1.0) > 1e-3 for cs in _coefs(a).values() for c in cs)

    # retention: the newest 2 complete checkpoints, nothing else
    complete, incomplete = scan(run_dir)
    assert [p.name for p in complete] == ["step_00000020", "step_00000022"] and not incomplete

    # the single-process reference: same steps (leftover micro-batches dropped in both), same
    # coefficients up to float noise (the main gradient is tiny here, so its coefficient is
    # ill-conditioned: up to 1% relative after a few steps), same weights to 1e-4
    ref_dir = tmp_path / "local"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's (cpus_per_worker=1), whatever earlier tests left
    try:
        train_local(_cfg(tiny_data, ref_dir), progress=False)
    finally:
        torch.set_num_threads(threads)
    ref = _last_per_step(_records(ref_dir))
    assert sorted(ref) == sorted(a) == list(range(1, STEPS + 1))
    for s in ref:
        for x, y in zip(_coefs(ref)[s], _coefs(a)[s]):
            assert abs(x - y) <= 2e-2 * abs(x), (s, x, y)
    # the logged loss is the step's (the mean over its 5 micro-batches), as the reference logs it
    for s in ref:
        for k in ("loss/main", "loss/category", "loss/ner"):
            assert abs(ref[s][k] - a[s][k]) <= 1e-3 * abs(ref[s][k]), (s, k, ref[s][k], a[s][k])
    wr = _weights(ref_dir)
    assert set(wr) == set(wa)
    assert max((wr[k] - wa[k]).abs().max().item() for k in wr) < 1e-4
