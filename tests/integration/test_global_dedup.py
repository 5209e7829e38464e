"""data.dedup=global == data.dedup=rank == 1 process, under DeepSpeed ZeRO 0-3 with surgery.

Two gloo workers (torch.multiprocessing spawn) train the real MTRec and MINER models (tiny
random BERT, dropout 0) on the real loader's per-rank batches of the tiny synthetic data for 3
optimizer steps (of 1 or 2 accumulated micro-batches) through ``MultiTaskGradients``, once
per-rank (each rank encodes its own titles) and once with the global exchange (each title of
the global micro-batch encoded once, by its owner, vectors all-gathered). One process computes
the same steps explicitly: per rank and micro-batch the per-rank model loss, per-group
gradients from ``torch.autograd.grad`` averaged over ranks and micro-batches, the surgery on
flat vectors, ``torch.optim.AdamW`` with the DeepSpeed config's hyperparameters. Losses summed
over ranks, the per-group global gradient norms and coefficients, and the parameters after 3
steps must agree at fp32 noise. MINER runs with its category bias and the weighted aggregator
(the features that read the gathered vectors and categories) and its disagreement term in a
gradient group of its own, so both groups' backward passes run the exchange's collective. All configurations run inside one spawn (DeepSpeed's start-up
is paid once). A direct check: the gradient of a title that only rank 0 uses, encoded by rank 1,
arrives on rank 1 and equals rank 0's own per-rank gradient of that title's vector.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrec_dist.models import layer_cache
from mtrec_dist.models.outputs import group_losses
from tests.gloo_workers import ds_config, free_port, init_gloo_deepspeed
from tests.surgery_reference import reference_step

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
STEPS = 3
MICRO = 4  # samples per micro-batch per worker
MINER_K = 4  # interest vectors: small, the equivalence does not depend on K
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-3, 0.01  # eps large: updates stay smooth in g
CLIP = 1.0
SEED = 7  # PCGrad's visiting order
GROUPS2 = {"main": {"main": 1.0}, "aux": {"category": 0.3, "ner": 0.3}}
GROUPS3 = {"main": {"main": 1.0}, "category": {"category": 1.0}, "ner": {"ner": 1.0}}
# MINER's disagreement term in a group of its own, weighted 3, with 10x peakier context codes
# (``build``): on the tiny random BERT at beta 0.8 its gradient is ~4,000x smaller than the main
# one, and the surgery coefficient 1 - g_m.g_a / |g_a|^2 then magnifies fp32 noise by that ratio
# (coefficients 309-908); this way both gradients are of one scale (coefficients 1.0-2.9) and
# compared at the MTRec cases' tolerance. (Weight 10 made the run sensitive enough that fp32
# summation order moved the parameters by 1e-5; the float64 check below shows the paths agree.)
GROUPS_MINER = {"main": {"main": 1.0}, "aux": {"disagreement": 3.0}}
MINER_CODES_SCALE = 10.0
GROUPS = {"g2": GROUPS2, "g3": GROUPS3, "miner": GROUPS_MINER}
# Surgery coefficients global vs per-rank: MINER's (1.0-2.9, a ratio of gradient dot products)
# differed by 6e-6 relative at ZeRO-3 on this machine's BLAS, too close to 1e-5 to hold on
# another CPU; test_global_gradients_equal_rank_in_float64 is the exact check (1e-12).
COEF_RTOL = {"g2": 1e-5, "g3": 1e-5, "miner": 5e-5}


@dataclass(frozen=True)
class Case:
    model: str
    stage: int  # ZeRO stage
    surgery: str
    groups: str  # key of GROUPS
    gas: int = 1  # micro-batches accumulated per optimizer step
    # "" = the DeepSpeed JSON's AdamW; "lrgroups" = the trainers' optimizer (train/optim.py:
    # encoder.* at ENC_LR, the rest at LR, no decay on biases/LayerNorm) and schedule;
    # "frozen" = the same with every encoder.* parameter frozen (reference: train/local.py's
    # reference_step; nothing shared, so every coefficient is exactly 1);
    # "cached" = the trainers' optimizer with model.train_layers=1: the workers read the lower
    # layer from the per-news cache they built together (docs/design.md §3.1), the reference
    # computes it (no cache)
    variant: str = ""

    @property
    def name(self) -> str:
        tail = f"-{self.variant}" if self.variant else ""
        return f"{self.model}-{self.surgery}-z{self.stage}-gas{self.gas}{tail}"


CASES = [
    *[Case("mtrec", s, "mtrec", "g2") for s in (0, 1)],  # the stages beyond 2 and 3
    *[Case("mtrec", s, m, g) for s in (2, 3) for m, g in (("mtrec", "g2"), ("pcgrad", "g3"))],
    Case("mtrec", 2, "mtrec", "g2", gas=2),  # the owner weights per accumulated micro-batch
    *[Case("miner", s, "mtrec", "miner") for s in (2, 3)],
    Case("mtrec", 3, "mtrec", "g2", gas=2, variant="lrgroups"),
    Case("mtrec", 2, "mtrec", "g2", variant="frozen"),
    Case("mtrec", 2, "mtrec", "g2", variant="cached"),
]
ENC_LR = 3e-3
SCHED_TOTAL, SCHED_WARMUP = 5, 0.4
MODEL_NAMES = sorted({c.model for c in CASES})


def make_cfg(data_root: str, model: str = "mtrec"):
    from mtrec_dist.config import load_config

    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.root={data_root}",
            f"model.name={model}",
            f"model.miner_k={MINER_K}",
            "model.dropout=0.0",
            "model.pooling=mean",
            "trainer.micro_batch=4",
        ],
    )


def rank_batches(cfg, rank: int, n: int) -> list:
    """The real loader's first ``n`` per-rank micro-batches of ``rank`` (of WORLD ranks)."""
    from itertools import islice

    from mtrec_dist.data.stream import loader_for

    return list(islice(loader_for(cfg, rank=rank, world_size=WORLD, epoch=0), n))


def loss_values(losses: dict[str, torch.Tensor]) -> list[float]:
    """The task losses in name order (MTRec: category, main, ner; MINER: disagreement, main)."""
    return [float(losses[k].detach()) for k in sorted(losses)]


def build(cfg, variant: str = ""):
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.models.registry import build_model

    if variant == "cached":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, train_layers=1))
    torch.manual_seed(1234)
    model = build_model(cfg, load_manifest(cfg.prepared_dir))
    if cfg.model.name == "miner":  # see GROUPS_MINER
        with torch.no_grad():
            model.poly.codes.mul_(MINER_CODES_SCALE)
    if variant == "frozen":
        model.encoder.requires_grad_(False)
    return model


def own_optimizer(model):
    """The trainers' optimizer and schedule (train/optim.py): two lrs, weight decay."""
    from mtrec_dist.config import TrainerConfig
    from mtrec_dist.train.optim import build_optimizer, build_scheduler

    t = TrainerConfig(lr=LR, encoder_lr=ENC_LR, weight_decay=WD, adam_eps=EPS)
    opt = build_optimizer(model, t)
    return opt, build_scheduler(opt, SCHED_TOTAL, SCHED_WARMUP)


# --- distributed side ----------------------------------------------------------------------


def _train(cfg, table, batches, case: Case, dedup: str) -> dict:
    import deepspeed

    from mtrec_dist.models.dedup import exchange_batch
    from mtrec_dist.train.ds_engine import MultiTaskGradients

    groups, stage = GROUPS[case.groups], case.stage
    model = build(cfg, case.variant)
    if case.variant == "cached":  # both ranks build the cache together, then read it
        rank = torch.distributed.get_rank()
        assert layer_cache.attach(model, cfg.prepared_dir, rank=rank, world=WORLD, progress=False)
    ds = ds_config(stage, MICRO, case.gas, WORLD, (LR, BETAS, EPS, WD), CLIP)
    if case.variant:
        opt, sched = own_optimizer(model)
        del ds["optimizer"]
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    else:
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds
        )
    mtg = MultiTaskGradients(
        engine,
        model,
        list(groups),
        case.surgery,
        "shared",
        model.shared_parameter_names(),
        seed=SEED,
    )
    losses, norms, coefs, titles = [], [], [], []  # losses and titles per micro-batch
    for micro, batch in enumerate(batches[: STEPS * case.gas]):
        if dedup == "global":
            batch = exchange_batch(batch, table, engine.device)
        titles.append([batch.num_titles, batch.global_unique])
        out = engine(batch)
        losses.append(loss_values(out.losses))
        mtg.backward(group_losses(out.losses, groups))
        if (micro + 1) % case.gas:
            continue
        st = mtg.step(micro // case.gas)
        norms.append([st[f"grad/norm/{g}"] for g in groups])
        coefs.append([st[f"grad/coef/{g}"] for g in groups])
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.destroy()
    return {
        "params": params,
        "losses": torch.tensor(losses, dtype=torch.float64),
        "norms": torch.tensor(norms, dtype=torch.float64),
        "coefs": torch.tensor(coefs, dtype=torch.float64),
        "titles": torch.tensor(titles),
    }


def _owner_gradient(cfg, table, batches, rank: int) -> dict:
    """A title only rank 0 uses and rank 1 owns: its vector's gradient on the owner (global)
    and on rank 0's own per-rank path (main loss only, no DeepSpeed)."""
    import torch.distributed as dist

    from mtrec_dist.models.dedup import exchange_batch, gather_news_vectors, plan_exchange
    from mtrec_dist.models.heads import nce_loss

    model = build(cfg)
    for batch in batches:
        rows = [None] * WORLD
        dist.all_gather_object(rows, batch.news_rows.numpy())
        plan = plan_exchange(rows, 1)
        mine = set(plan.owned[: plan.owned_real].tolist())
        used0 = set(rows[0][batch.hist_idx[batch.hist_mask]].tolist()) if rank == 0 else set()
        found = [None]
        if rank == 0:
            only0 = sorted((used0 & mine) - set(rows[1].tolist()))
            found = [only0[0] if only0 else None]
        dist.broadcast_object_list(found, src=0)
        if found[0] is not None:
            break
    assert found[0] is not None, "no title of rank 0 is owned by rank 1 in the first steps"
    x = int(found[0])

    def main_loss(vecs, b):
        return nce_loss(model.score_news_vectors(vecs, b), b.cand_mask, b.sample_mask)

    out = {"row": x}
    if rank == 0:  # per-rank path: rank 0 encodes x itself
        vecs = model.encode_news(batch)
        vecs.retain_grad()
        main_loss(vecs, batch).backward()
        out["per_rank"] = vecs.grad[int(np.flatnonzero(batch.news_rows.numpy() == x)[0])].clone()
        model.zero_grad()
    g = exchange_batch(batch, table, "cpu")
    owned = model.encode_news(g)
    owned.retain_grad()
    main_loss(gather_news_vectors(owned, g.global_unique), g).backward()
    if rank == 1:
        out["owner"] = owned.grad[int(np.flatnonzero(g.news_rows.numpy() == x)[0])].clone()
    return out


def _fp64_gradients(cfg, table, batches, rank: int) -> list[list[float]]:
    """Float64, no DeepSpeed: per micro-batch and task loss, [max |difference|, max |value|] of
    the gradient (mean over ranks, all parameters) of the global path against the per-rank path.
    Under global an auxiliary loss is its owner's share; the sum over ranks is the same."""
    import torch.distributed as dist

    from mtrec_dist.models.dedup import exchange_batch

    model = build(cfg).double()
    params = list(model.parameters())

    def mean_gradient(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, params)
            ]
        )
        dist.all_reduce(flat)
        return flat / WORLD

    out = []
    for batch in batches:
        per_rank, glob = model(batch).losses, model(exchange_batch(batch, table, "cpu")).losses
        for k in sorted(per_rank):
            a, b = mean_gradient(per_rank[k]), mean_gradient(glob[k])
            out.append([float((a - b).abs().max()), float(a.abs().max())])
    return out


def _worker(rank: int, port: int, out_dir: str, data_root: str) -> None:
    init_gloo_deepspeed(rank, WORLD, port)
    from mtrec_dist.data.batch import NewsTable

    cfgs = {m: make_cfg(data_root, m) for m in MODEL_NAMES}
    table = NewsTable(cfgs["mtrec"].prepared_dir)
    n = STEPS * max(c.gas for c in CASES)
    batches = {m: rank_batches(cfg, rank, n) for m, cfg in cfgs.items()}
    results = {
        f"{case.name}-{dedup}": _train(cfgs[case.model], table, batches[case.model], case, dedup)
        for case in CASES
        for dedup in ("rank", "global")
    }
    for m in MODEL_NAMES:
        results[f"fp64-{m}"] = torch.tensor(
            _fp64_gradients(cfgs[m], table, batches[m][:STEPS], rank), dtype=torch.float64
        )
    results["owner_gradient"] = _owner_gradient(
        cfgs["mtrec"], table, batches["mtrec"][:STEPS], rank
    )
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tiny_data):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(free_port(), d, str(tiny_data)), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


# --- single-process reference --------------------------------------------------------------


def reference(cfg, case: Case) -> dict:
    """Per rank and micro-batch the per-rank model on its batch; per-group gradients averaged
    over ranks and micro-batches; explicit surgery on the shared encoder's flat vectors; AdamW.
    The frozen variant is stepped by the project's own reference trainer instead."""
    model = build(cfg, case.variant)
    assert model.encoder.cache is None  # the cached variant's reference computes the layer
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    shared = model.shared_parameter_names()
    is_shared = [n in shared for n, _ in named]
    sched = None
    if case.variant:
        opt, sched = own_optimizer(model)
    else:
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    gas, groups = case.gas, GROUPS[case.groups]
    batches = [rank_batches(cfg, r, STEPS * gas) for r in range(WORLD)]
    names = list(groups)
    losses, norms = [], []  # losses per micro-batch, summed over ranks
    if case.variant == "frozen":
        return _local_reference(model, batches, case, opt, sched)
    for step in range(STEPS):
        acc = {g: [torch.zeros_like(p) for p in params] for g in names}
        for k in range(gas):
            total = 0
            for r in range(WORLD):
                out = model(batches[r][step * gas + k])
                total = total + torch.tensor(loss_values(out.losses), dtype=torch.float64)
                gl = group_losses(out.losses, groups)
                for g in names:
                    grads = torch.autograd.grad(gl[g], params, retain_graph=True, allow_unused=True)
                    for a, gr in zip(acc[g], grads):
                        if gr is not None:
                            a.add_(gr / (WORLD * gas))  # mean over workers and micro-steps
            losses.append(total)
        norms.append(reference_step(params, is_shared, acc, case.surgery, SEED, step, CLIP, opt))
        if sched is not None:
            sched.step()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "losses": torch.stack(losses),
        "norms": torch.tensor(norms, dtype=torch.float64),
    }


def _local_reference(model, batches, case: Case, opt, sched) -> dict:
    """train/local.py reference_step (the single-process trainer) on each global batch."""
    from mtrec_dist.train.local import reference_step as local_step

    gas, groups = case.gas, GROUPS[case.groups]
    losses, norms, coefs = [], [], []
    for step in range(STEPS):
        mbs = [batches[r][step * gas + k] for k in range(gas) for r in range(WORLD)]
        for k in range(gas):
            with torch.no_grad():
                vals = [loss_values(model(batches[r][step * gas + k]).losses) for r in range(WORLD)]
            losses.append(torch.tensor(vals, dtype=torch.float64).sum(0))
        st = local_step(
            model, mbs, groups, case.surgery, "shared", opt, seed=SEED, step=step, grad_clip=CLIP
        )
        sched.step()
        norms.append(st["gram"].diagonal().clamp_min(0).sqrt().tolist())
        coefs.append(st["coefficients"].tolist())
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "losses": torch.stack(losses),
        "norms": torch.tensor(norms, dtype=torch.float64),
        "coefs": torch.tensor(coefs, dtype=torch.float64),
    }


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_global_equals_rank_equals_one_process(distributed_results, tiny_data, case):
    ref = reference(make_cfg(str(tiny_data), case.model), case)
    per = {d: [res[f"{case.name}-{d}"] for res in distributed_results] for d in ("rank", "global")}
    for d, runs in per.items():
        # losses: the sum over ranks (under global each aux loss is its owner's share)
        torch.testing.assert_close(
            sum(r["losses"] for r in runs), ref["losses"], rtol=1e-5, atol=1e-6
        )
        for rank, got in enumerate(runs):
            # the global per-group gradient norms (the Gram diagonal) and surgery coefficients
            torch.testing.assert_close(got["norms"], ref["norms"], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(
                got["coefs"], per["rank"][rank]["coefs"], rtol=COEF_RTOL[case.groups], atol=1e-7
            )
            for n, p in ref["params"].items():
                torch.testing.assert_close(
                    got["params"][n], p, rtol=0, atol=1e-5, msg=f"{d} rank {rank}: {n}"
                )
            if case.variant == "frozen":  # nothing shared: G = 0, no projection anywhere
                assert bool((got["norms"] == 0).all()) and bool((got["coefs"] == 1).all())
                assert bool((ref["coefs"] == 1).all())
    # the exchange did save work: each rank encoded S = ceil(U_g / 2) titles, and U_g is
    # below the sum of the per-rank distinct counts (titles shared across ranks)
    rank_titles = sum(r["titles"][:, 0] for r in per["rank"])
    glob = per["global"][0]["titles"]
    for r in per["global"]:
        torch.testing.assert_close(r["titles"][:, 0], (glob[:, 1] + WORLD - 1) // WORLD)
    assert bool((glob[:, 1] < rank_titles).all()), (glob, rank_titles)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_global_gradients_equal_rank_in_float64(distributed_results, model):
    """Without DeepSpeed's fp32 arithmetic, each task loss's gradient over all parameters (mean
    over ranks) is the per-rank path's up to float64 rounding, on every micro-batch."""
    for res in distributed_results:
        diff, scale = res[f"fp64-{model}"].T
        assert bool((scale > 1e-3).all()), scale  # the gradients are not vacuously zero
        assert bool((diff <= 1e-12 * scale).all()), (diff, scale)


@pytest.mark.timeout(900)
def test_gradient_reaches_the_owner(distributed_results):
    """A title that only rank 0 uses, encoded by rank 1: rank 1's vector gradient is exactly
    rank 0's own per-rank gradient of that title (the differentiable all-gather's backward)."""
    r0, r1 = (res["owner_gradient"] for res in distributed_results)
    assert r0["row"] == r1["row"]
    assert float(r0["per_rank"].abs().max()) > 0
    torch.testing.assert_close(r1["owner"], r0["per_rank"], rtol=1e-5, atol=1e-7)
