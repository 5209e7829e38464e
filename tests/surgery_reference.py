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
