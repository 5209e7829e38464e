"""The per-worker training loop that Ray Train runs on every worker (docs/design.md §4.3
Distributed form under ZeRO, §5 Steps and epochs, §6 Checkpoints and resume).

Reads top to bottom: set up (model, DeepSpeed engine, multi-task gradients, resume), then per
micro-batch: (data.dedup=global) this rank's share of the global batch's titles -> one
forward -> per-task losses -> gradient-group losses -> one backward per group; at the accumulation boundary one fused surgery step; then log and checkpoint. Step
counting (and what happens to an epoch's leftover micro-batches) is ``train/steps.py``'s.

On a GPU the step never waits for the device to hand the host a number (docs/design.md §5, the
GPU step): losses, sample counts and the surgery's statistics stay tensors in a
:class:`StepBook` and are read on the host only when :func:`flush_due` says so (log,
checkpoint, evaluation and last steps), where every pending step's record is written at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
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
    book = StepBook(world, t.grad_accum, engine.device)

    if t.eval_every and pos.step == 0:  # the untrained model: the point a curve starts from
        _evaluate(engine, model, cfg, log, 0)

    # --- loop --------------------------------------------------------------------------
    for epoch in range(pos.epoch, t.epochs):
        if pos.step >= total:  # resumed at the end (a finished run): no step past max_steps
            break
        skip = pos.batches_done if epoch == pos.epoch else 0
        loader = loader_for(cfg, rank=rank, world_size=world, epoch=epoch, skip_batches=skip)
        micro = 0
        book.start()
        for batch in epoch_micro_batches(loader, plan, skip):
            if table is not None:  # collective: this rank's share of the global batch's titles
                batch = exchange_batch(batch, table, engine.device)
            batch = batch.to(engine.device, non_blocking=True)  # pinned by the loader on a GPU
            out = engine(batch)
            mtg.backward(group_losses(out.losses, cfg.model.groups))
            book.micro(out.losses, batch)
            micro += 1
            if micro % t.grad_accum:
                continue
            stats = mtg.step(pos.step, defer=True)  # surgery + optimizer step + lr schedule
            book.close_step(pos.step + 1, stats, scheduler.get_last_lr()[0], table is not None)
            pos = Position(pos.step + 1, epoch, loader.batches_done, pos.samples)
            if flush_due(pos.step, t, total):  # the host reads the pending steps' numbers
                pos = replace(pos, samples=pos.samples + book.flush(log))
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
    pos = replace(pos, samples=pos.samples + book.flush(log))  # none left: the last step flushed
    export_final(engine, model, cfg, manifest, pos, rank, run_id)
    if log is not None:
        log.close()


def flush_due(step: int, trainer: Any, total: int) -> bool:
    """Whether optimizer step ``step`` (1-based) reads the pending steps on the host: a step the
    console shows (``trainer.log_every``), one that checkpoints (the position's sample count and
    the log lines up to it reach the disk first), one that evaluates, and the last one."""
    t = trainer
    return (
        step % max(t.log_every, 1) == 0
        or bool(t.checkpoint_every and step % t.checkpoint_every == 0)
        or bool(t.eval_every and step % t.eval_every == 0)
        or step >= total
    )


@dataclass
class PendingStep:
    """One optimizer step's log record, its numbers still tensors (or a function forming them)."""

    step: int  # 1-based, as logged
    losses: dict[str, torch.Tensor]  # detached global-batch task losses (0-d, on the device)
    stats: Callable[[], dict[str, float]]  # the surgery's statistics (MultiTaskGradients.step)
    host: dict[str, float]  # statistics known on the host (memory, times, title counts)
    lr: float
    real: torch.Tensor  # real samples of this rank's micro-batches (0-d, on the device)
    titles: int  # titles this rank encoded
    secs: float  # wall seconds from the previous step's end (device work may still be queued)


class StepBook:
    """The loop's per-step bookkeeping, kept on the device between flushes (docs/design.md §5,
    the GPU step): :meth:`micro` and :meth:`close_step` never read a tensor on the host;
    :meth:`flush` does, once per pending step, and writes their records in order."""

    def __init__(self, world: int, grad_accum: int, device: torch.device) -> None:
        self.world, self.gas, self.device = world, grad_accum, device
        self.pending: list[PendingStep] = []
        self.start()

    def start(self) -> None:
        """A new accumulation window (each epoch's first step, and after every step)."""
        self.loss_sum: dict[str, torch.Tensor] = {}  # detached task losses over the window
        self.real: torch.Tensor | None = None
        self.titles = self.distinct = 0
        self.t0, self.c0 = time.monotonic(), time.process_time()

    def micro(self, losses: Mapping[str, torch.Tensor], batch: Any) -> None:
        """Adds one micro-batch (on the device) to the window."""
        for k, v in losses.items():
            self.loss_sum[k] = self.loss_sum.get(k, 0.0) + v.detach().float()
        real = batch.sample_mask.sum()
        self.real = real if self.real is None else self.real + real
        self.titles += batch.num_titles
        self.distinct += batch.global_unique

    def close_step(
        self, step: int, stats: Callable[[], dict[str, float]], lr: float, global_dedup: bool
    ) -> None:
        """Sets the window aside as step ``step``'s record (collective when world > 1: the
        mean loss over ranks, an all-reduce queued on the device)."""
        host = {"mem/peak_mb": ds.peak_memory_mb(self.device)}
        gpu = ds.gpu_peak_mb(self.device)
        if gpu is not None:  # training on CUDA: the allocator's peak (bench/gpu_check.py reads it)
            host["mem/gpu_peak_mb"] = gpu
        host["time/cpu_s"] = time.process_time() - self.c0  # this process's CPU, all threads
        host["time/unix"] = time.time()  # when the step ended (start-up = first - launch)
        if global_dedup:  # titles encoded this step = W * S (real + pads) vs U_g
            host["titles/encoded"] = float(self.titles * self.world)
            host["titles/global_distinct"] = float(self.distinct)
        losses = {k: v / self.gas for k, v in self.loss_sum.items()}
        if self.world > 1:  # the global batch's loss, as the single-process reference logs it
            losses = _mean_over_ranks(losses)
        real = self.real if self.real is not None else torch.zeros((), dtype=torch.long)
        secs = time.monotonic() - self.t0
        self.pending.append(PendingStep(step, losses, stats, host, lr, real, self.titles, secs))
        self.start()

    def flush(self, log: RunLogger | None) -> int:
        """Reads the pending steps on the host (the synchronisation the steps between flushes
        did without), writes their records to ``log`` (rank 0) and returns their real samples,
        all ranks (the position's count, as before: this rank's times the world)."""
        samples = 0
        for p in self.pending:
            real = int(p.real)
            samples += real * self.world
            if log is not None:
                stats = {**p.stats(), **p.host}
                losses = {k: float(v) for k, v in p.losses.items()}
                n, titles = real * self.world, p.titles * self.world
                log.step(p.step, losses, stats, p.lr, n, titles, p.secs)
        self.pending = []
        return samples


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
                    bf16=cfg.eval.bf16,
                )
            model.train()
            log.metrics(step, metrics)
    if dist.is_initialized():
        dist.barrier()


def _cuda_devices(engine) -> list:
    return [engine.device] if engine.device.type == "cuda" else []
