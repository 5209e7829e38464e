"""For the tests and the quality harness: the single-process reference trainer (flat surgery).

Its job is to be the *reference* the distributed trainer must equal (N workers under ZeRO ==
this process on the same global batch; one worker == :func:`train_local` over whole runs). So it
favours obviousness over speed: every group gradient is a full copy, obtained with
``torch.autograd.grad`` from one forward pass per micro-batch.

Semantics of one optimizer step over ``micro_batches`` (all workers' and all accumulation
micro-steps' batches of the global batch): the gradient of each group is the mean over
micro-batches of the gradient of that micro-batch's group loss (what DeepSpeed's averaging
computes); surgery (MTRec §2.3, eq. 10-11) combines the group gradients once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mtrec_dist.config import Config, dump_config
from mtrec_dist.data.prepared import check_tokenizer, load_manifest
from mtrec_dist.data.stream import loader_for
from mtrec_dist.hub import load_tokenizer, tokenizer_fingerprint
from mtrec_dist.models import layer_cache
from mtrec_dist.models.outputs import group_losses
from mtrec_dist.models.registry import build_model, resolve_groups
from mtrec_dist.train import surgery
from mtrec_dist.train.export import export_run
from mtrec_dist.train.logging import step_record
from mtrec_dist.train.optim import build_optimizer, build_scheduler
from mtrec_dist.train.steps import epoch_micro_batches, step_plan
from mtrec_dist.utils import Progress


def _gram(flat: list[torch.Tensor]) -> torch.Tensor:
    m = torch.stack([f.double() for f in flat])  # [T, P]
    return m @ m.T  # [T, T]


def reference_step(
    model: torch.nn.Module,
    micro_batches: list,
    groups: dict[str, dict[str, float]],
    mode: str,
    scope: str,
    optimizer: torch.optim.Optimizer,
    *,
    seed: int = 0,
    step: int = 0,
    grad_clip: float = 0.0,
) -> dict:
    """One optimizer step with explicit surgery; returns losses, Gram and coefficients."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    shared = model.shared_parameter_names() if scope == "shared" else {n for n, _ in named}
    acc: dict[str, list[torch.Tensor]] = {}
    task_losses: dict[str, float] = {}
    n_mb = len(micro_batches)
    for mb in micro_batches:
        out = model(mb)
        for t, v in out.losses.items():
            task_losses[t] = task_losses.get(t, 0.0) + float(v.detach()) / n_mb
        gl = group_losses(out.losses, groups)
        for g, loss in gl.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            buf = acc.setdefault(g, [torch.zeros_like(p) for p in params])
            for b, gr in zip(buf, grads):
                if gr is not None:
                    b.add_(gr, alpha=1.0 / n_mb)
    names = list(acc)
    is_shared = [n in shared for n, _ in named]
    # No trainable shared parameter (a wholly frozen encoder): the groups share nothing, G is
    # the zero matrix and every method gives c = 1 (docs/design.md §4.1).
    empty = [torch.zeros(0)]
    flat = [
        torch.cat([b.reshape(-1) for b, s in zip(acc[g], is_shared) if s] + empty) for g in names
    ]
    gram = _gram(flat)
    c = surgery.coefficients(mode, gram, names, seed=seed, step=step)
    for i, (p, s) in enumerate(zip(params, is_shared)):
        coef = c if s else torch.ones_like(c)
        p.grad = sum(float(coef[k]) * acc[g][i] for k, g in enumerate(names))
    if grad_clip > 0:  # on the combined gradient, as DeepSpeed's gradient_clipping does
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"losses": task_losses, "groups": names, "gram": gram, "coefficients": c}


def train_local(
    cfg: Config,
    progress: bool = True,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> dict:
    """Train in this process (one worker, no DeepSpeed, no Ray) and export the run folder.

    This is the single-process reference the distributed trainer is tested against: the same
    data stream (``world_size=1``), step plan and leftover rule (``train/steps.py``), log keys
    and export, with the surgery written out on flat vectors (:func:`reference_step`). A
    distributed run with one worker must end with the same weights and coefficients.

    ``on_step(step, model)`` runs once before the first update (step 0) and after every
    optimizer step (the quality benchmark measures its learning curves there; the model is put
    back in train mode afterwards)."""
    manifest = load_manifest(cfg.prepared_dir)
    check_tokenizer(manifest, tokenizer_fingerprint(load_tokenizer(cfg.model.encoder)))
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, manifest)
    layer_cache.attach(model, cfg.prepared_dir, deadline_s=cfg.trainer.timeout_s, progress=progress)
    cfg.model.groups = resolve_groups(cfg, model)
    model.train()
    t = cfg.trainer
    plan = step_plan(manifest, 1, t)
    steps = plan.total_steps
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, steps, t.warmup_ratio)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    print(
        f"train: {type(model).__name__} on {cfg.prepared_dir}; global batch = {t.micro_batch} "
        f"micro x {t.grad_accum} accumulation x 1 worker = {t.micro_batch * t.grad_accum}; "
        f"{plan.batches_per_epoch} batches/epoch ({plan.steps_per_epoch} optimizer steps), "
        f"{steps} steps; surgery={t.surgery} ({t.surgery_scope})",
        flush=True,
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if t.surgery_scope == "shared" and t.surgery != "none":
        if not model.shared_parameter_names() & trainable:
            print(surgery.nothing_shared_notice(t.surgery, t.surgery_scope), flush=True)
    bar = Progress("train", steps, unit="steps", every=0.0 if t.log_every else 30.0)
    step, samples, t0 = 0, 0, time.monotonic()
    if on_step is not None:
        on_step(0, model)
        model.train()
    with open(run_dir / "train_log.jsonl", "a", encoding="utf-8") as log:
        for epoch in range(t.epochs):
            pending: list = []  # the leftover rule: never carried into the next epoch
            loader = loader_for(cfg, rank=0, world_size=1, epoch=epoch)
            for batch in epoch_micro_batches(loader, plan):
                pending.append(batch)
                if len(pending) < t.grad_accum:
                    continue
                stats = reference_step(
                    model, pending, cfg.model.groups, t.surgery, t.surgery_scope, optimizer,
                    seed=t.seed, step=step, grad_clip=t.grad_clip,
                )  # fmt: skip
                samples += sum(int(b.sample_mask.sum()) for b in pending)
                pending = []
                scheduler.step()
                step += 1
                rec = _log_record(step, stats, scheduler.get_last_lr()[0], samples, t0)
                log.write(json.dumps(rec) + "\n")
                if on_step is not None:
                    on_step(step, model)
                    model.train()
                _show(bar, step, t.log_every, rec)
                if step >= steps:
                    break
            if step >= steps:
                break
    bar.close()
    export_run(model, cfg, manifest, step)
    return {"steps": step, "samples": samples, "run_dir": str(run_dir)}


def _show(bar: Progress, step: int, every: int, rec: dict) -> None:
    if every and step % every == 0:
        bar.n = step - 1
        bar.update(1, extra=_short(rec))
    else:
        bar.n = step


def _log_record(step: int, stats: dict, lr: float, samples: int, t0: float) -> dict:
    gram = stats["gram"]
    head = {"samples": samples, "elapsed_s": time.monotonic() - t0}
    grads: dict[str, float] = {}
    for k, g in enumerate(stats["groups"]):
        grads[surgery.coef_key(g)] = float(stats["coefficients"][k])
        grads[surgery.norm_key(g)] = max(float(gram[k, k]), 0.0) ** 0.5
    if len(stats["groups"]) >= 2:
        grads[surgery.COS_BEFORE] = surgery.cosine(gram, 0, 1)
    return step_record(step, lr, stats["losses"], grads, head)


def _short(rec: dict) -> str:
    parts = [f"{k.split('/')[1]}={v:.4f}" for k, v in rec.items() if k.startswith("loss/")]
    if surgery.COS_BEFORE in rec:
        parts.append(f"cos={rec[surgery.COS_BEFORE]:+.3f}")
    return " ".join(parts) + f" lr={rec['lr']:.2e}"
