"""The GPU step, checked on the CPU (docs/design.md §5, the GPU step): between flushes the
training step reads no tensor on the host (on a GPU each read is a synchronisation), the records
written at a flush equal the ones an eagerly read step gives, the surgery's coefficients come
without a host read, the loader pins only for a trainer on CUDA, and the Gram matrix of bf16
gradients is float64."""

from __future__ import annotations

import contextlib
import copy
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from mtrec_dist.config import ConfigError, load_config
from mtrec_dist.data.prepared import load_manifest
from mtrec_dist.data.stream import loader_for, pin_batches, train_loader
from mtrec_dist.models.outputs import group_losses
from mtrec_dist.models.registry import build_model
from mtrec_dist.train import surgery
from mtrec_dist.train.ds_engine import MultiTaskGradients, _Slot
from mtrec_dist.train.dsconfig import resolve_deepspeed
from mtrec_dist.train.loop import StepBook, flush_due
from tests.zero0_engine import Zero0Engine

# Every way Python code turns a tensor into a host value (a device synchronisation on a GPU).
HOST_READS = ("item", "__float__", "__int__", "__index__", "__bool__", "tolist", "cpu", "numpy")


@contextlib.contextmanager
def counting_host_reads(raise_on_read: bool = False):
    """Counts (or refuses) the host reads of tensors made by this package's own code; torch's
    and DeepSpeed's internals are not ours to count (AdamW reads its CPU step counter)."""
    calls: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, fn):
        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            mod = frame.f_globals.get("__name__", "")
            if mod.startswith("mtrec_dist"):
                if raise_on_read:
                    raise AssertionError(f"host read {name} at {mod}:{frame.f_lineno}")
                calls[f"{name} at {mod}:{frame.f_lineno}"] += 1
            return fn(self, *args, **kwargs)

        return read

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


# --------------------------------------------------------------------------- the surgery


def _gram(a, b, d):
    return torch.tensor([[a, d], [d, b]], dtype=torch.float64)


@pytest.mark.parametrize(
    "mode,gram,expect",
    [
        # d = -2 < 0: c_m = 1 - d/|g_a|^2 -> P[m, a] = 2/1, P[a, m] = 2/4 (MTRec eq. 10)
        ("mtrec", _gram(4.0, 1.0, -2.0), [[1.0, 2.0], [0.5, 1.0]]),
        ("mtrec", _gram(4.0, 1.0, 1.0), [[1.0, 0.0], [0.0, 1.0]]),
        # a zero auxiliary gradient: d = 0, no projection, and no nan from 0/0
        ("mtrec", _gram(4.0, 0.0, 0.0), [[1.0, 0.0], [0.0, 1.0]]),
        ("aux_only", _gram(4.0, 1.0, -2.0), [[1.0, 0.0], [0.5, 1.0]]),
        ("aux_only", _gram(0.0, 1.0, 0.0), [[1.0, 0.0], [0.0, 1.0]]),
        # T = 2: each row projected once onto the other (Yu et al. 2020, Algorithm 1)
        ("pcgrad", _gram(4.0, 1.0, -2.0), [[1.0, 2.0], [0.5, 1.0]]),
        ("pcgrad", _gram(0.0, 1.0, 0.0), [[1.0, 0.0], [0.0, 1.0]]),
        ("none", _gram(4.0, 1.0, -2.0), [[1.0, 0.0], [0.0, 1.0]]),
    ],
)
def test_projection_by_hand_without_a_host_read(mode, gram, expect):
    with counting_host_reads(raise_on_read=True):
        p = surgery.projection(mode, gram, ["main", "aux"], seed=0, step=3)
    assert p.dtype == torch.float64 and p.device == gram.device
    assert p.tolist() == expect


def test_pcgrad_three_groups_by_hand_without_a_host_read():
    """G with g_0 conflicting g_1 and g_2; the visiting order is pcgrad_order's."""
    g = torch.tensor([[4.0, -2.0, -1.0], [-2.0, 1.0, 0.0], [-1.0, 0.0, 2.0]], dtype=torch.float64)
    with counting_host_reads(raise_on_read=True):
        p = surgery.projection("pcgrad", g, ["a", "b", "c"], seed=1, step=0)
    ref = [[1.0 if i == k else 0.0 for k in range(3)] for i in range(3)]
    for i, order in enumerate(surgery.pcgrad_order(3, 1, 0)):  # Algorithm 1 in plain floats
        for j in order:
            dot = sum(ref[i][k] * g.tolist()[k][j] for k in range(3))
            if dot < 0 and g.tolist()[j][j] > 0:
                ref[i][j] -= dot / g.tolist()[j][j]
    assert p.tolist() == ref


def test_gram_of_bf16_gradients_is_float64_by_hand():
    """a·a = 2^24 + 1 + 2^24 = 2^25 + 1 needs 26 significant bits: float32 sums give 2^25, bf16
    less; the values themselves are exact in bf16."""
    a = torch.tensor([2.0**12, 1.0, -(2.0**12)], dtype=torch.bfloat16)
    b = torch.tensor([1.0, 2.0**12, 3.0], dtype=torch.bfloat16)
    held = a[None].clone()  # group 0 set aside, group 1 in DeepSpeed's buffer
    last = b.clone()
    slots = [_Slot(last[:2], 0, True, True), _Slot(last[2:], 2, True, True)]
    fake = SimpleNamespace(groups=["main", "aux"], _segments=[(0, 3)], _world=1)
    got = MultiTaskGradients._gram(fake, slots, held)
    ab = 2.0**12 + 2.0**12 - 3 * 2.0**12  # = -4096
    bb = 1.0 + 2.0**24 + 9.0
    assert got.dtype == torch.float64
    assert got.tolist() == [[2.0**25 + 1, ab], [ab, bb]]


def test_fp16_with_a_surgery_is_refused_bf16_is_not(tmp_path):
    p = tmp_path / "fp16.json"
    p.write_text('{"fp16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match="fp16.enabled with trainer.surgery=mtrec"):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}", "trainer.surgery=mtrec"]))
    assert resolve_deepspeed(load_config(None, [f"deepspeed={p}", "trainer.surgery=none"]))[
        "fp16"
    ] == {"enabled": True}
    q = tmp_path / "bf16.json"
    q.write_text('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    ds = resolve_deepspeed(load_config(None, [f"deepspeed={q}", "trainer.surgery=pcgrad"]))
    assert ds["bf16"] == {"enabled": True}


# --------------------------------------------------------------------------- pinned batches


@pytest.mark.parametrize(
    "use_gpu,cuda,expect", [(True, True, True), (True, False, False), (False, True, False)]
)
def test_pin_only_for_a_trainer_on_cuda(use_gpu, cuda, expect):
    assert pin_batches(use_gpu, cuda) is expect


def test_loader_for_pins_when_the_trainer_is_on_cuda(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("trainer.use_gpu=true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only build
    assert loader_for(cfg, rank=0, world_size=1, epoch=0).pin_memory is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loader_for(cfg, rank=0, world_size=1, epoch=0).pin_memory is True
    cpu = tiny_cfg()
    assert loader_for(cpu, rank=0, world_size=1, epoch=0).pin_memory is False


def test_batch_to_non_blocking_keeps_every_field(tiny_cfg):
    cfg = tiny_cfg()
    b = next(iter(loader_for(cfg, rank=0, world_size=1, epoch=0)))
    moved = b.to(torch.device("cpu"), non_blocking=True)
    for name, v in vars(b).items():
        w = getattr(moved, name)
        if isinstance(v, torch.Tensor):
            assert w.dtype == v.dtype and torch.equal(w, v), name
        else:
            assert w == v, name


# --------------------------------------------------------------------------- the step


def test_flush_due_by_hand():
    t = SimpleNamespace(log_every=5, checkpoint_every=4, eval_every=0)
    assert [s for s in range(1, 15) if flush_due(s, t, 14)] == [4, 5, 8, 10, 12, 14]
    t0 = SimpleNamespace(log_every=0, checkpoint_every=0, eval_every=3)
    assert [s for s in range(1, 5) if flush_due(s, t0, 100)] == [1, 2, 3, 4]  # 0 = every step


class _Log:
    def __init__(self):
        self.records = []

    def step(self, step, losses, stats, lr, samples, titles, secs):
        self.records.append((step, losses, stats, lr, samples, titles))


GAS, STEPS = 2, 4
SURGERY_KEYS = {
    "grad/norm/main", "grad/norm/aux", "grad/coef/main", "grad/coef/aux", "grad/cos_before",
    "grad/conflict", "grad/norm_combined", "grad/cos_after", "grad/cos_combined_0",
    "grad/cos_combined_1", "surgery/time_s", "surgery/extra_bytes", "surgery/partition_elems",
    "surgery/extra_over_partition",
}  # fmt: skip
HOST_KEYS = {"mem/peak_mb", "time/cpu_s", "time/unix"}  # no mem/gpu_peak_mb off CUDA


def _setup(tiny_cfg):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg, load_manifest(cfg.prepared_dir)).eval()  # no dropout
    loader = train_loader(
        cfg.prepared_dir, rank=0, world_size=1, batch_size=4, epoch=0, seed=0, neg_k=4,
        history_len=10, loader_workers=0,
    )  # fmt: skip
    batches = list(loader)[: GAS * STEPS]
    assert len(batches) == GAS * STEPS
    return cfg, model, batches


def _engine(cfg, model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = Zero0Engine(model, opt, GAS, "cpu")
    groups = list(cfg.model.groups)
    mtg = MultiTaskGradients(
        engine, model, groups, "mtrec", "shared", model.shared_parameter_names()
    )
    return engine, mtg


def test_steps_between_flushes_read_nothing_on_the_host(tiny_cfg):
    """The loop's step (forward, one backward per group, the fused surgery step, the StepBook)
    with log_every=3 over 4 steps: no host read on steps 1 and 2; step 3 (logged) and step 4
    (the last) flush, and their records equal an eagerly read run's, key by key."""
    cfg, model, batches = _setup(tiny_cfg)
    eager_model = copy.deepcopy(model)
    trainer = SimpleNamespace(log_every=3, checkpoint_every=0, eval_every=0)

    engine, mtg = _engine(cfg, model)
    book, log = StepBook(1, GAS, engine.device), _Log()
    reads_in_steps, reads_in_flush, flushed_at, samples = [], [], [], 0
    for s in range(1, STEPS + 1):
        with counting_host_reads() as calls:
            for b in batches[(s - 1) * GAS : s * GAS]:
                b = b.to(engine.device, non_blocking=True)
                out = engine(b)
                mtg.backward(group_losses(out.losses, cfg.model.groups))
                book.micro(out.losses, b)
            book.close_step(s, mtg.step(s - 1, defer=True), 1e-3, False)
        reads_in_steps.append(sum(calls.values()))
        if flush_due(s, trainer, STEPS):
            with counting_host_reads() as calls:
                samples += book.flush(log)
            reads_in_flush.append(sum(calls.values()))
            flushed_at.append((s, [r[0] for r in log.records]))
    assert reads_in_steps == [0, 0, 0, 0]
    assert flushed_at == [(3, [1, 2, 3]), (4, [1, 2, 3, 4])]
    assert all(n > 0 for n in reads_in_flush)  # the reads happen there, once per record value
    assert samples == sum(int(b.sample_mask.sum()) for b in batches)

    # the same run, every number read on the host at once (the loop before the StepBook)
    engine, mtg = _engine(cfg, eager_model)
    for s in range(1, STEPS + 1):
        losses: dict[str, float] = {}
        real = 0
        for b in batches[(s - 1) * GAS : s * GAS]:
            out = engine(b)
            mtg.backward(group_losses(out.losses, cfg.model.groups))
            for k, v in out.losses.items():
                losses[k] = losses.get(k, 0.0) + v.detach().float()
            real += int(b.sample_mask.sum())
        stats = mtg.step(s - 1)
        step, got_losses, got_stats, lr, n, titles = log.records[s - 1]
        assert step == s and lr == 1e-3 and n == real
        assert titles == sum(b.num_titles for b in batches[(s - 1) * GAS : s * GAS])
        assert got_losses == {k: float(v / GAS) for k, v in losses.items()}
        assert set(got_stats) == SURGERY_KEYS | HOST_KEYS
        for k in SURGERY_KEYS - {"surgery/time_s"}:  # time: wall clock
            assert got_stats[k] == stats[k], k
    for (n, p), q in zip(model.named_parameters(), eager_model.parameters()):
        assert torch.equal(p, q), n
