"""The single-process reference trainer equals explicit flat-vector surgery (MTRec eq. 10-11)."""

import copy

import torch

from mtrec_dist.data.prepared import load_manifest
from mtrec_dist.data.stream import train_loader
from mtrec_dist.models.outputs import group_losses
from mtrec_dist.models.registry import build_model
from mtrec_dist.train.local import reference_step


def _setup(tiny_cfg, groups):
    cfg = tiny_cfg()
    cfg.model.groups = groups
    torch.manual_seed(0)
    model = build_model(cfg, load_manifest(cfg.prepared_dir)).eval()  # no dropout: deterministic
    batches = list(
        train_loader(
            cfg.prepared_dir,
            rank=0,
            world_size=1,
            batch_size=4,
            epoch=0,
            seed=0,
            neg_k=4,
            history_len=10,
            loader_workers=0,
        )
    )[:2]
    return cfg, model, batches


def _explicit(model, batches, groups, mode):
    """Per-group mean gradients as flat vectors; surgery written out with vectors."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shared = model.shared_parameter_names()
    gs = {}
    for g in groups:
        acc = [torch.zeros_like(p) for _, p in named]
        for b in batches:
            loss = group_losses(model(b).losses, groups)[g]
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for a, gr in zip(acc, grads):
                if gr is not None:
                    a += gr / len(batches)
        gs[g] = acc
    sel = [n in shared for n, _ in named]
    flat = {g: torch.cat([a.reshape(-1) for a, s in zip(gs[g], sel) if s]).double() for g in gs}
    gm, ga = flat["main"], flat["aux"]
    d = gm @ ga
    if mode == "mtrec" and d < 0:
        comb = (gm - d / (ga @ ga) * ga) + (ga - d / (gm @ gm) * gm)
    else:
        comb = gm + ga
    out, off = [], 0
    for (_, p), s, am, aa in zip(named, sel, gs["main"], gs["aux"]):
        if s:
            out.append(comb[off : off + p.numel()].view_as(p).float())
            off += p.numel()
        else:
            out.append(am + aa)  # task-specific heads: unprojected
    return out, float(d)


def _step_and_grads(model, batches, groups, mode):
    """Run reference_step with SGD(lr=1) so that the update is exactly minus the gradient."""
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    stats = reference_step(model, batches, groups, mode, "shared", opt)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    return [b - a for b, a in zip(before, after)], stats


def test_mtrec_surgery_matches_explicit_vectors_on_a_conflict(tiny_cfg):
    groups = {"main": {"main": 1.0}, "aux": {"main": -2.0, "category": 0.1, "ner": 0.1}}
    cfg, model, batches = _setup(tiny_cfg, groups)
    expect, d = _explicit(copy.deepcopy(model), batches, groups, "mtrec")
    assert d < 0  # aux contains -2 x main: a real conflict
    got, stats = _step_and_grads(model, batches, groups, "mtrec")
    assert stats["groups"] == ["main", "aux"]
    assert stats["coefficients"][0] != 1.0 and stats["coefficients"][1] != 1.0
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_none_is_the_gradient_of_the_summed_loss(tiny_cfg):
    groups = {"main": {"main": 1.0}, "aux": {"category": 0.3, "ner": 0.3}}
    cfg, model, batches = _setup(tiny_cfg, groups)
    ref = copy.deepcopy(model)
    params = [p for p in ref.parameters() if p.requires_grad]
    total = sum(sum(group_losses(ref(b).losses, groups).values()) for b in batches) / len(batches)
    expect = torch.autograd.grad(total, params, allow_unused=True)
    got, _ = _step_and_grads(model, batches, groups, "none")
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-4, atol=1e-6)
