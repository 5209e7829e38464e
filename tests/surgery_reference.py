"""Explicit flat-vector PCGrad (Yu et al. 2020, Algorithm 1): the reference both the
Gram-coefficient tests and the distributed ZeRO tests check the fused surgery against."""

from __future__ import annotations

import torch

from mtrec_dist.train.surgery import pcgrad_order


def pcgrad_projected(vecs: list[torch.Tensor], seed: int, step: int) -> list[torch.Tensor]:
    """Each task's gradient projected off every conflicting one, in the same seeded order."""
    out = []
    for i, order in enumerate(pcgrad_order(len(vecs), seed, step)):
        gi = vecs[i].clone()
        for j in order:
            d = gi @ vecs[j]
            if d < 0:
                gi = gi - d / (vecs[j] @ vecs[j]) * vecs[j]
        out.append(gi)
    return out


def projected(vecs: list[torch.Tensor], mode: str, seed: int, step: int) -> list[torch.Tensor]:
    """Explicit flat-vector surgery by name: the projected gradient of each group."""
    if mode == "none":
        return vecs
    if mode == "mtrec":  # MTRec eq. 10 both ways between main and merged aux
        gm, ga = vecs
        d = gm @ ga
        if d < 0:
            return [gm - d / (ga @ ga) * ga, ga - d / (gm @ gm) * gm]
        return [gm, ga]
    assert mode == "pcgrad", mode  # Yu et al. 2020, Algorithm 1
    return pcgrad_projected(vecs, seed, step)


def reference_step(
    params: list[torch.Tensor],
    is_shared: list[bool],
    acc: dict[str, list[torch.Tensor]],
    mode: str,
    seed: int,
    step: int,
    clip: float,
    opt: torch.optim.Optimizer,
) -> list[float]:
    """One optimizer step of the single-process references: the per-group gradients ``acc``
    (mean over workers) -> surgery on the shared parameters' flat float64 vectors, a plain
    sum for the rest -> global-norm clipping -> ``opt.step()``. Returns the per-group norms."""
    names = list(acc)
    none = [torch.zeros(0)]  # no trainable shared parameter (frozen encoder): empty vectors, G = 0
    flat = [
        torch.cat([a.reshape(-1) for a, s in zip(acc[g], is_shared) if s] + none).double()
        for g in names
    ]
    combined = sum(projected(flat, mode, seed, step))  # shared part after surgery, flat
    off = 0
    for i, (p, s) in enumerate(zip(params, is_shared)):
        if s:
            p.grad = combined[off : off + p.numel()].view_as(p).float()
            off += p.numel()
        else:
            p.grad = sum(acc[g][i] for g in names)  # task heads: plain sum
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return [float(v.norm()) for v in flat]
