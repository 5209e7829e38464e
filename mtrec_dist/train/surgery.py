"""Multi-task gradient surgery as pure functions of the Gram matrix (docs/design.md §4.1).

Every method here turns the T×T Gram matrix ``G[s, t] = g_s · g_t`` of the global task-group
gradients into a *projection matrix* ``P`` [T, T]: the projected gradient of group i is
``g_i' = Σ_k P[i, k] g_k``. The combined gradient is the sum of the projected ones (summed,
not averaged, so ``none`` equals ordinary training on the total loss), hence

    g = Σ_i g_i' = Σ_k c_k g_k   with   c = P.sum(0).

Working in the basis {g_t} means a method never sees a parameter: the distributed trainer
(``ds_engine.py``) all-reduces T² partial dot products and every rank derives the same ``c``.

Methods are picked by name from ``METHODS`` (LibMTL-style registry; ``none`` is one of them, so
the training loop never names a method):

- ``none``: P = I, g = Σ g_t.
- ``mtrec``: MTRec (Bi et al., Findings of ACL 2022) §2.3, eq. 10 applied both ways between the
  main group and the merged, λ-scaled auxiliary group of eq. 11 (Fig. 3(c)). With d = g_m·g_a < 0:
  g_m' = g_m − d/‖g_a‖² g_a and g_a' = g_a − d/‖g_m‖² g_m, so
  c_m = 1 − d/‖g_m‖², c_a = 1 − d/‖g_a‖². Otherwise c = (1, 1).
- ``aux_only``: the ablation that leaves the main gradient untouched and projects only the
  auxiliary one: g_m' = g_m, g_a' = g_a − d/‖g_m‖² g_m, so c_m = 1 − d/‖g_m‖², c_a = 1.
- ``pcgrad``: Yu et al. 2020 (NeurIPS), Algorithm 1, for any T: each g_i^PC starts at g_i and is
  projected, in a random order of the other tasks, onto the normal plane of every g_j it
  conflicts with (``g_i^PC · g_j < 0``). The order is drawn from ``numpy.random.default_rng((seed,
  step))`` (one permutation of the other tasks per i, for i = 0..T−1 in turn), so every rank
  draws the same order without communication.

A projection onto the normal plane of a zero gradient is skipped (it is not a conflict: the dot
product is 0, and dividing by ‖g_j‖² = 0 would be undefined).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mtrec_dist.config import SURGERY_METHODS

ProjectionFn = Callable[[torch.Tensor, list[str], int, int], torch.Tensor]


def _check_gram(gram: torch.Tensor, groups: list[str]) -> torch.Tensor:
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] != len(groups):
        raise ValueError(
            f"gram must be [T, T] with T = len(groups) = {len(groups)}; got {tuple(gram.shape)}"
        )
    return gram.to(torch.float64)


def _main_aux(groups: list[str], mode: str) -> tuple[int, int]:
    """Indices of the main and the auxiliary group: ``main`` by name, else the first one."""
    if len(groups) != 2:
        raise ValueError(
            f"trainer.surgery={mode!r} needs exactly 2 gradient groups (main, aux); got "
            f"{groups}; use 'pcgrad' for {len(groups)} groups"
        )
    m = groups.index("main") if "main" in groups else 0
    return m, 1 - m


# Every branch below is a ``torch.where`` on the Gram's own device, never a Python ``if`` on a
# tensor: on a GPU an ``if d < 0`` is a host synchronisation at every optimizer step, and the
# coefficients must reach the fused combination without one (docs/design.md §5, the GPU step).
# The value not chosen may be inf/nan (a division by a zero norm); ``where`` discards it.


def _eye(gram: torch.Tensor, t: int) -> torch.Tensor:
    return torch.eye(t, dtype=torch.float64, device=gram.device)


def _if_conflict(cond: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` where ``cond`` holds, else 0 (a 0-d float64 tensor, no host round trip)."""
    return torch.where(cond, value, torch.zeros_like(value))


def _none(gram: torch.Tensor, groups: list[str], seed: int, step: int) -> torch.Tensor:
    return _eye(gram, len(groups))


def _mtrec(gram: torch.Tensor, groups: list[str], seed: int, step: int) -> torch.Tensor:
    m, a = _main_aux(groups, "mtrec")
    p = _eye(gram, 2)
    d, nm, na = gram[m, a], gram[m, m], gram[a, a]
    conflict = d < 0  # d < 0 implies both norms > 0
    p[m, a] = _if_conflict(conflict, -d / na)  # g_m' = g_m − (g_m·g_a / ‖g_a‖²) g_a  (eq. 10)
    p[a, m] = _if_conflict(conflict, -d / nm)  # g_a' = g_a − (g_a·g_m / ‖g_m‖²) g_m  (eq. 10)
    return p


def _aux_only(gram: torch.Tensor, groups: list[str], seed: int, step: int) -> torch.Tensor:
    m, a = _main_aux(groups, "aux_only")
    p = _eye(gram, 2)
    d, nm = gram[m, a], gram[m, m]
    p[a, m] = _if_conflict(d < 0, -d / nm)  # only the auxiliary gradient leaves its direction
    return p


def pcgrad_order(t: int, seed: int, step: int) -> list[list[int]]:
    """For each task i, the order in which PCGrad visits the other tasks (same on every rank)."""
    rng = np.random.default_rng((seed, step))
    return [[int(j) for j in rng.permutation([j for j in range(t) if j != i])] for i in range(t)]


def _pcgrad(gram: torch.Tensor, groups: list[str], seed: int, step: int) -> torch.Tensor:
    t = len(groups)
    p = _eye(gram, t)  # row i: g_i^PC in the basis {g_k}
    for i, order in enumerate(pcgrad_order(t, seed, step)):
        for j in order:
            dot = p[i] @ gram[:, j]  # g_i^PC · g_j = Σ_k P[i, k] G[k, j]
            p[i, j] -= _if_conflict((dot < 0) & (gram[j, j] > 0), dot / gram[j, j])
    return p


_FUNCTIONS: dict[str, ProjectionFn] = {
    "none": _none,
    "mtrec": _mtrec,
    "aux_only": _aux_only,
    "pcgrad": _pcgrad,
}
# Named once, in config.SURGERY_METHODS (which validates trainer.surgery); a name without a
# function here fails at import.
METHODS: dict[str, ProjectionFn] = {name: _FUNCTIONS[name] for name in SURGERY_METHODS}

# Log keys every trainer writes for a step's surgery (train_log.jsonl and TensorBoard).
COS_BEFORE = "grad/cos_before"  # cos(g_0, g_1) of the first two groups before surgery
COS_AFTER = "grad/cos_after"  # the same between the projected gradients


def coef_key(group: str) -> str:
    """Log key of a group's coefficient c_t in the combined gradient."""
    return f"grad/coef/{group}"


def norm_key(group: str) -> str:
    """Log key of a group's global gradient norm."""
    return f"grad/norm/{group}"


def projection(
    mode: str, gram: torch.Tensor, groups: list[str], *, seed: int = 0, step: int = 0
) -> torch.Tensor:
    """Projection matrix P [T, T] (float64): projected g_i' = Σ_k P[i, k] g_k."""
    fn = METHODS.get(mode)
    if fn is None:
        raise ValueError(
            f"trainer.surgery={mode!r} is not a surgery method; allowed: {', '.join(METHODS)}"
        )
    return fn(_check_gram(gram, groups), list(groups), seed, step)


def coefficients(
    mode: str, gram: torch.Tensor, groups: list[str], *, seed: int = 0, step: int = 0
) -> torch.Tensor:
    """Coefficients c [T] (float64) with the combined gradient g = Σ_t c_t g_t."""
    return projection(mode, gram, groups, seed=seed, step=step).sum(0)


def cosine(gram: torch.Tensor, i: int, j: int) -> float:
    """cos(g_i, g_j) from the Gram matrix; 0 when either gradient is zero."""
    den = float(gram[i, i]) * float(gram[j, j])
    return float(gram[i, j]) / den**0.5 if den > 0 else 0.0


def combined_gram_stats(gram: torch.Tensor, proj: torch.Tensor) -> dict[str, float]:
    """Cosines after surgery, for MTRec Appendix B / Fig. 5(b).

    "After surgery" means between the *projected* group gradients g_m', g_a' (the arrows of
    Fig. 3(c) that are summed into g), whose Gram matrix is P G Pᵀ. It takes ``proj`` (P), not
    ``c``: with c alone the contributions c_m g_m and c_a g_a keep the angle of g_m and g_a, which
    says nothing. Also returned: the cosine between the combined g = Σ c_t g_t and each g_t
    (how much the step still follows each group), and the combined gradient's norm.
    """
    gram = gram.to(torch.float64)
    proj = proj.to(torch.float64)
    after = proj @ gram @ proj.T  # Gram of the projected gradients
    c = proj.sum(0)
    gc = gram @ c  # g · g_t for every t
    nn = float(c @ gc)  # ‖g‖²
    out: dict[str, float] = {"grad/norm_combined": max(nn, 0.0) ** 0.5}
    t = gram.shape[0]
    if t >= 2:
        out[COS_AFTER] = cosine(after, 0, 1)
    for k in range(t):
        den = nn * float(gram[k, k])
        out[f"grad/cos_combined_{k}"] = float(gc[k]) / den**0.5 if den > 0 else 0.0
    return out


def nothing_shared_notice(mode: str, scope: str) -> str:
    """The start-up line of a run whose surgery scope holds no trainable parameter (every
    shared parameter frozen, e.g. a wholly frozen encoder): the groups share nothing, so the
    Gram matrix is 0 and every method gives c = 1 (docs/design.md §4.1)."""
    return (
        f"notice: trainer.surgery={mode} with surgery_scope={scope}, but no shared parameter "
        "trains (frozen encoder): nothing to reconcile, every coefficient is 1"
    )
