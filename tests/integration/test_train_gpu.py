"""One fp32 training step on CUDA equals the same step on the CPU (docs/design.md §5, the GPU
step): the tiny BERT of configs/tiny.yaml (random weights from ``BertConfig``), the same seed
and micro-batches, the loop's step code (pinned batches copied without blocking, one backward
per group, the fused surgery with its coefficients formed on the device, the StepBook), the
project's AdamW; weights after the step within 1e-5 relative. CUDA only (``gpu`` marker)."""

from __future__ import annotations

import copy

import pytest
import torch

from mtrec_dist.data.prepared import load_manifest
from mtrec_dist.data.stream import train_loader
from mtrec_dist.models.outputs import group_losses
from mtrec_dist.models.registry import build_model
from mtrec_dist.train.ds_engine import MultiTaskGradients
from mtrec_dist.train.loop import StepBook
from mtrec_dist.train.optim import build_optimizer
from tests.zero0_engine import Zero0Engine

GAS = 2


class _Log:
    def __init__(self):
        self.records = []

    def step(self, step, losses, stats, lr, samples, titles, secs):
        self.records.append((losses, stats))


def one_step(cfg, model, batches, device: str) -> tuple[dict, dict]:
    """One optimizer step of ``model`` (moved to ``device``) over ``batches``, as the loop takes
    it; returns the step's logged losses and statistics."""
    model.to(device)
    engine = Zero0Engine(model, build_optimizer(model, cfg.trainer), GAS, device)
    t, groups = cfg.trainer, list(cfg.model.groups)
    mtg = MultiTaskGradients(
        engine, model, groups, t.surgery, t.surgery_scope, model.shared_parameter_names(), t.seed
    )
    book = StepBook(1, GAS, engine.device)
    for b in batches:
        if engine.device.type == "cuda":
            b = b.pin_memory()  # as the loader hands them out to a trainer on CUDA
        b = b.to(engine.device, non_blocking=True)
        out = engine(b)
        mtg.backward(group_losses(out.losses, cfg.model.groups))
        book.micro(out.losses, b)
    book.close_step(1, mtg.step(0, defer=True), t.lr, False)
    log = _Log()
    book.flush(log)
    return log.records[0]


@pytest.mark.gpu
def test_one_fp32_step_on_cuda_equals_the_step_on_cpu(tiny_cfg, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 products
    cfg = tiny_cfg()
    torch.manual_seed(0)
    # eval(): no dropout, whose masks would come from two different generators
    cpu_model = build_model(cfg, load_manifest(cfg.prepared_dir)).eval()
    gpu_model = copy.deepcopy(cpu_model)
    batches = list(
        train_loader(
            cfg.prepared_dir, rank=0, world_size=1, batch_size=8, epoch=0, seed=0, neg_k=4,
            history_len=10, loader_workers=0,
        )
    )[:GAS]  # fmt: skip
    before = {n: p.detach().clone() for n, p in cpu_model.named_parameters()}
    cpu_losses, cpu_stats = one_step(cfg, cpu_model, batches, "cpu")
    gpu_losses, gpu_stats = one_step(cfg, gpu_model, batches, "cuda")

    assert next(gpu_model.parameters()).dtype == torch.float32
    moved = 0
    for (name, p), q in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-7, msg=name)
        moved += int(not torch.equal(p.detach(), before[name]))
    assert moved > 0  # the step changed the weights
    for k, v in cpu_losses.items():
        assert gpu_losses[k] == pytest.approx(v, rel=1e-5), k
    for k in ("grad/norm/main", "grad/norm/aux", "grad/coef/main", "grad/coef/aux"):
        assert gpu_stats[k] == pytest.approx(cpu_stats[k], rel=1e-5, abs=1e-9), k
    # the step log's CUDA memory key (bench/gpu_check.py reads it), absent on the CPU
    assert 0 < gpu_stats["mem/gpu_peak_mb"] <= torch.cuda.max_memory_allocated() / 2**20
    assert "mem/gpu_peak_mb" not in cpu_stats
