"""The per-worker training loop that Ray Train runs on every worker (DESIGN.md §1, §4).

Reads top to bottom: set up (model, DeepSpeed engine, multi-task gradients, resume), then per
micro-batch: one forward -> per-task losses -> gradient-group losses -> one backward per
group; at the accumulation boundary one fused surgery step; then log and checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from mtrec_dist.config import Config, config_from_dict
from mtrec_dist.models.outputs import group_losses


@dataclass
class Position:
    """Where training is: restored from a checkpoint so the data stream continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` consumed (same on every rank)
    samples: int = 0  # real training samples seen, all ranks


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker (``train_loop_per_worker``)."""
    import deepspeed  # imported here, not on the driver (ray#50406)
    import ray.train

    from mtrec_dist.data.shards import load_manifest
    from mtrec_dist.data.stream import batches_per_epoch, loader_for
    from mtrec_dist.models.registry import build_model
    from mtrec_dist.train.checkpoint import restore, save
    from mtrec_dist.train.logging import RunLogger
    from mtrec_dist.train.optim import build_optimizer, build_scheduler
    from mtrec_dist.train.zero import MultiTaskGradients

    cfg: Config = config_from_dict(config["cfg"])
    ds_config: dict = config["ds"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = cfg.trainer

    # --- setup -------------------------------------------------------------------------
    if not t.use_gpu:
        torch.set_num_threads(t.cpus_per_worker)  # the CPUs Ray reserved for this worker
    torch.manual_seed(t.seed)
    manifest = load_manifest(cfg.prepared_dir)
    model = build_model(cfg, manifest)
    per_epoch = batches_per_epoch(manifest, world, t.micro_batch, t.seed, 0) // t.grad_accum
    total = per_epoch * t.epochs
    total = min(total, t.max_steps) if t.max_steps > 0 else total
    optimizer = build_optimizer(model.parameters(), t.lr, t.weight_decay, t.adam_eps)
    scheduler = build_scheduler(optimizer, total, t.warmup_ratio)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    groups = [g for g in cfg.model.groups]
    mtg = MultiTaskGradients(
        engine, model, groups, t.surgery, t.surgery_scope, model.shared_parameter_names(), t.seed
    )
    pos = restore(engine, ray.train.get_checkpoint()) or Position()
    log = RunLogger(cfg, rank, total, start_step=pos.step) if rank == 0 else None

    # --- loop --------------------------------------------------------------------------
    for epoch in range(pos.epoch, t.epochs):
        skip = pos.batches_done if epoch == pos.epoch else 0
        loader = loader_for(cfg, rank=rank, world_size=world, epoch=epoch, skip_batches=skip)
        micro, t0, titles, real = 0, time.monotonic(), 0, 0
        for batch in loader:
            batch = batch.to(engine.device)
            out = engine(batch)
            mtg.backward(group_losses(out.losses, cfg.model.groups))
            titles, real, micro = (
                titles + batch.num_titles,
                real + int(batch.sample_mask.sum()),
                micro + 1,
            )
            if micro % t.grad_accum:
                continue
            stats = mtg.step()  # surgery + optimizer step + lr schedule
            stats["mem/peak_mb"] = _peak_memory_mb(engine)
            pos = Position(pos.step + 1, epoch, loader.batches_done, pos.samples + real * world)
            if log is not None:
                log.step(
                    pos.step,
                    out.losses,
                    stats,
                    scheduler.get_last_lr()[0],
                    real * world,
                    titles * world,
                    time.monotonic() - t0,
                )
            titles, real, t0 = 0, 0, time.monotonic()
            if t.checkpoint_every and pos.step % t.checkpoint_every == 0:
                save(engine, cfg, pos, rank)
            if t.eval_every and pos.step % t.eval_every == 0:
                _evaluate(engine, model, cfg, log, pos.step)
            if pos.step >= total:
                break
        if pos.step >= total:
            break
        pos = Position(pos.step, epoch + 1, 0, pos.samples)

    # --- end -----------------------------------------------------------------------------
    from mtrec_dist.train.checkpoint import export_final

    export_final(engine, model, cfg, manifest, pos, rank)
    if log is not None:
        log.close()


def _peak_memory_mb(engine) -> float:
    """Peak accelerator memory of this worker, else its peak resident memory (MiB)."""
    if engine.device.type == "cuda":
        return torch.cuda.max_memory_allocated(engine.device) / 2**20
    from mtrec_dist.utils import peak_rss_mb

    return peak_rss_mb()


def _evaluate(engine, model, cfg: Config, log, step: int) -> None:
    """Periodic dev metrics on rank 0 (every rank joins the gathers under ZeRO-3)."""
    import deepspeed
    import torch.distributed as dist

    from mtrec_dist.eval.evaluate import evaluate_model

    stage3 = engine.zero_optimization_stage() == 3
    ctx = deepspeed.zero.GatheredParameters(list(model.parameters())) if stage3 else _Null()
    with ctx:
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


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
