"""The per-worker training loop that Ray Train runs on every worker (docs/design.md §4.3
Distributed form under ZeRO, §5 Steps and epochs, §6 Checkpoints and resume).

Reads top to bottom: set up (model, DeepSpeed engine, multi-task gradients, resume), then per
micro-batch: (data.dedup=global) this rank's share of the global batch's titles -> one
forward -> per-task losses -> gradient-group losses -> one backward per group; at the accumulation boundary one fused surgery step; then log and checkpoint. Step
counting (and what happens to an epoch's leftover micro-batches) is ``train/steps.py``'s.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from mtrec_dist.config import Config, config_from_dict
from mtrec_dist.data.batch import NewsTable
from mtrec_dist.data.prepared import load_manifest
from mtrec_dist.data.stream import loader_for
from mtrec_dist.eval.evaluate import evaluate_model
from mtrec_dist.models import layer_cache
from mtrec_dist.models.dedup import exchange_batch
from mtrec_dist.models.outputs import group_losses
from mtrec_dist.models.registry import build_model, global_dedup
from mtrec_dist.train import ds_engine as ds
from mtrec_dist.train.checkpoint import (
    Position,
    export_final,
    newest_complete,
    restore,
    restore_rng,
    save,
)
from mtrec_dist.train.console import say_once
from mtrec_dist.train.ds_engine import MultiTaskGradients, gathered
from mtrec_dist.train.logging import RunLogger
from mtrec_dist.train.optim import build_optimizer, build_scheduler
from mtrec_dist.train.steps import epoch_micro_batches, step_plan


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker (``train_loop_per_worker``)."""
    import ray.train  # lazy: the driver imports this module before validating (launch.py)

    cfg: Config = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = cfg.trainer

    # --- setup -------------------------------------------------------------------------
    if not t.use_gpu:
        torch.set_num_threads(t.cpus_per_worker)  # the CPUs Ray reserved for this worker
    torch.manual_seed(t.seed)
    manifest = load_manifest(cfg.prepared_dir)
    model = build_model(cfg, manifest)
    # The frozen layers' output, built once per node by its workers together (§3.1).
    layer_cache.attach(
        model, cfg.prepared_dir, rank=ctx.get_local_rank(), world=ctx.get_local_world_size(),
        deadline_s=t.timeout_s, progress=rank == 0,
    )  # fmt: skip
    plan = step_plan(manifest, world, t)
    total = plan.total_steps
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, total, t.warmup_ratio)
    engine, optimizer, scheduler = ds.initialize(
        model, optimizer, scheduler, config["ds"], deadline_s=t.timeout_s
    )
    mtg = MultiTaskGradients(
        engine, model, list(cfg.model.groups), t.surgery, t.surgery_scope,
        model.shared_parameter_names(), t.seed,
    )  # fmt: skip
    run = config.get("run", {})  # this launch: its id, and whether it is a --resume
    run_id = run.get("id")
    folder = _resume_folder(cfg.run_dir, rank, None if run.get("resume") else run_id)
    pos = restore(engine, folder) or Position()
    if folder is not None:  # dropout continues with the generators the step would have had
        restore_rng(folder, rank)
    log = RunLogger(cfg, rank, total, start_step=pos.step) if rank == 0 else None
    table = NewsTable(cfg.prepared_dir) if global_dedup(cfg, world) else None

    if t.eval_every and pos.step == 0:  # the untrained model: the point a curve starts from
        _evaluate(engine, model, cfg, log, 0)

    # --- loop --------------------------------------------------------------------------
    for epoch in range(pos.epoch, t.epochs):
        if pos.step >= total:  # resumed at the end (a finished run): no step past max_steps
            break
        skip = pos.batches_done if epoch == pos.epoch else 0
        loader = loader_for(cfg, rank=rank, world_size=world, epoch=epoch, skip_batches=skip)
        micro, t0, c0, titles, real, distinct = 0, time.monotonic(), time.process_time(), 0, 0, 0
        loss_sum: dict[str, torch.Tensor] = {}  # detached task losses over the step's micro-batches
        for batch in epoch_micro_batches(loader, plan, skip):
            if table is not None:  # collective: this rank's share of the global batch's titles
                batch = exchange_batch(batch, table, engine.device)
            batch = batch.to(engine.device)
            out = engine(batch)
            mtg.backward(group_losses(out.losses, cfg.model.groups))
            for k, v in out.losses.items():
                loss_sum[k] = loss_sum.get(k, 0.0) + v.detach().float()
            titles, real = titles + batch.num_titles, real + int(batch.sample_mask.sum())
            distinct += batch.global_unique
            micro += 1
            if micro % t.grad_accum:
                continue
            stats = mtg.step(pos.step)  # surgery + optimizer step + lr schedule
            stats["mem/peak_mb"] = ds.peak_memory_mb(engine)
            stats["time/cpu_s"] = time.process_time() - c0  # this process's CPU, all threads
            stats["time/unix"] = time.time()  # when the step ended (start-up = first - launch)
            if table is not None:  # titles encoded this step = W * S (real + pads) vs U_g
                stats["titles/encoded"], stats["titles/global_distinct"] = titles * world, distinct
            losses = {k: v / t.grad_accum for k, v in loss_sum.items()}
            if world > 1:  # the global batch's loss, as the single-process reference logs it
                losses = _mean_over_ranks(losses)
            pos = Position(pos.step + 1, epoch, loader.batches_done, pos.samples + real * world)
            if log is not None:
                secs = time.monotonic() - t0
                lr = scheduler.get_last_lr()[0]
                log.step(pos.step, losses, stats, lr, real * world, titles * world, secs)
            titles, real, distinct, t0, c0 = 0, 0, 0, time.monotonic(), time.process_time()
            loss_sum = {}
            if t.checkpoint_every and pos.step % t.checkpoint_every == 0:
                save(engine, cfg, pos, rank, run_id)
            if t.eval_every and pos.step % t.eval_every == 0:
                _evaluate(engine, model, cfg, log, pos.step)
            if pos.step >= total:
                break
        if pos.step >= total:
            break
        pos = Position(pos.step, epoch + 1, 0, pos.samples)

    # --- end -----------------------------------------------------------------------------
    export_final(engine, model, cfg, manifest, pos, rank, run_id)
    if log is not None:
        log.close()


def _mean_over_ranks(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean over ranks of each (detached) task loss: the logged loss is the whole global
    batch's, not rank 0's share, and under data.dedup=global a per-news loss on one rank covers
    only the titles it owns, so only the mean equals data.dedup=rank's (collective: every rank
    calls it at every step)."""
    names = sorted(losses)
    v = torch.stack([losses[k].detach().float() for k in names])
    dist.all_reduce(v)
    return dict(zip(names, v / dist.get_world_size()))


def _resume_folder(run_dir: str, rank: int, run_id: str | None = None):
    """The newest complete checkpoint as rank 0 sees it, the same on every rank (with
    ``run_id``: only those that launch wrote). What it ignores reaches the console through
    ``console.log`` (a worker's own output stays in Ray's logs, docs/design.md §9)."""
    found = [newest_complete(run_dir, say_once(run_dir), run_id) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    return found[0]


def _evaluate(engine, model, cfg: Config, log, step: int) -> None:
    """Periodic dev metrics on rank 0 (every rank joins the gathers under ZeRO-3)."""
    # fork_rng: evaluating must not move the training generators, or a run resumed from a
    # checkpoint saved before this evaluation would draw other dropout masks (design.md §6)
    with gathered(model, engine), torch.random.fork_rng(devices=_cuda_devices(engine)):
        if log is not None:
            model.eval()
            with torch.no_grad():
                metrics = evaluate_model(
                    model,
                    cfg.prepared_dir,
                    "dev",
                    max_impressions=cfg.eval.max_impressions,
                    encode_batch=cfg.eval.encode_batch,
                )
            model.train()
            log.metrics(step, metrics)
    if dist.is_initialized():
        dist.barrier()


def _cuda_devices(engine) -> list:
    return [engine.device] if engine.device.type == "cuda" else []
