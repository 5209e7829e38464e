"""Cross-rank de-duplication (``data.dedup=global``): each title of the GLOBAL batch is encoded
once, by one rank, and the title vectors are exchanged with a differentiable collective.

Per-rank de-duplication (``collate``) encodes each distinct title of a rank's micro-batch once;
at 8-16 ranks the same popular titles are still encoded on every rank. Here, per micro-batch:

1. One exchange of integers: every rank all-gathers every rank's unique news rows, their
   history-occurrence counts ``c_r(u)`` and its per-task normalisers
   ``N_r,t = sum_u c_r(u) valid_t(u)`` (:func:`exchange_batch`).
2. A pure plan (:func:`plan_exchange`): the sorted union ``U_g`` of the rows is split into W
   contiguous shares of ``S = ceil(|U_g| / W)``; rank k owns ``U_g[k*S : (k+1)*S]``, the last
   shares padded with row 0 (the empty pad title), so every rank encodes exactly S titles (the
   all-gather needs equal sizes). Because the split is contiguous, ``U_g[i]`` lands at position
   i of the gathered ``[W*S, D]`` tensor and dropping the pads is ``[:|U_g|]``. Each rank
   remaps its own ``hist_idx`` / ``cand_idx`` to indices of ``U_g``.
3. The model encodes its S titles and :func:`gather_news_vectors` all-gathers them with
   ``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients of every
   rank into the owner (reduce-scatter with SUM on NCCL; all-to-all then a sum on gloo; both
   read in torch 2.13's ``torch/distributed/nn/functional.py``). Plain ``dist.all_gather``
   would return tensors without a gradient. The main loss stays the mean over this rank's real
   samples, so DeepSpeed's average over ranks gives exactly the per-rank path's gradient.
   A model that also reads an integer field of the titles its samples point at (MINER's
   category bias reads their categories) gathers it with :func:`gather_news_ids`.
4. Per-news auxiliary losses are computed once, on the owner, as ``sum_u w_t(u) l_t(u)`` with
   ``w_t(u) = valid_t(u) * sum_r c_r(u) / max(N_r,t, 1)`` (:func:`owner_weights`, float64,
   cast to the loss's dtype only inside the loss): summed over ranks this is ``sum_r L_r,t`` of
   the per-rank path (``heads.weighted_mean``), so the average DeepSpeed applies is the same.

The per-group backward passes of the surgery each run the all-gather's backward collective
inside every group's graph that reaches the gathered vectors (MTRec's main group; both of
MINER's, since its disagreement term reads the clicked news), in the same order on every rank;
graphs of heads on the owned titles alone (MTRec's auxiliary groups) hold no collective.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather

from mtrec_dist.data.batch import NEWS_TASKS, Batch, NewsTable, news_fields


@dataclass(frozen=True)
class ExchangePlan:
    """Who encodes which title, and where this rank's titles sit in the global unique rows."""

    rows: np.ndarray  # [n] int64 sorted unique news rows of the global batch (U_g)
    share: int  # S: titles every rank encodes (pads included)
    owned: np.ndarray  # [S] int64 news rows this rank encodes; 0 (pad title) past U_g's end
    start: int  # index in U_g of owned[0] (min(rank * S, n))
    owned_real: int  # how many of ``owned`` are real entries of U_g (the rest are pads)
    remap: np.ndarray  # [U_r] int64: this rank's local unique index -> index into U_g


def plan_exchange(rows_per_rank: list[np.ndarray], rank: int) -> ExchangePlan:
    """The ownership plan from every rank's unique rows (a pure function: every rank gets the
    same ``rows`` and ``share`` and its own ``owned`` / ``remap``)."""
    world = len(rows_per_rank)
    rows = np.unique(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows_per_rank]))
    n = int(rows.size)
    share = max(-(-n // world), 1)  # ceil(n / W); at least one title so shapes stay non-empty
    start = min(rank * share, n)
    real = rows[start : start + share]
    owned = np.zeros(share, dtype=np.int64)
    owned[: real.size] = real
    remap = np.searchsorted(rows, np.asarray(rows_per_rank[rank], dtype=np.int64))
    return ExchangePlan(rows, share, owned, start, int(real.size), remap.astype(np.int64))


def owned_sums(
    plan: ExchangePlan, rows_per_rank: list[np.ndarray], values_per_rank: list[np.ndarray]
) -> np.ndarray:
    """[S, ...] float64: per owned title, the sum over ranks of that rank's value for it (0 for
    pads and for ranks whose batch does not hold the title)."""
    vals = [np.asarray(v, dtype=np.float64) for v in values_per_rank]
    per_global = np.zeros((plan.rows.size, *vals[0].shape[1:]), dtype=np.float64)
    for rows, v in zip(rows_per_rank, vals):
        np.add.at(per_global, np.searchsorted(plan.rows, np.asarray(rows, dtype=np.int64)), v)
    out = np.zeros((plan.share, *vals[0].shape[1:]), dtype=np.float64)
    out[: plan.owned_real] = per_global[plan.start : plan.start + plan.owned_real]
    return out


def owner_weights(
    plan: ExchangePlan,
    rows_per_rank: list[np.ndarray],
    counts_per_rank: list[np.ndarray],
    norms: np.ndarray,
    owned_valid: np.ndarray,
) -> np.ndarray:
    """[S, T] float64 loss weights of the owned titles: ``valid_t(u) * sum_r c_r(u) /
    max(N_r,t, 1)``; pads get 0.

    ``counts_per_rank[r]`` [U_r]: history occurrences of rank r's unique rows; ``norms`` [W, T]:
    N_r,t; ``owned_valid`` [S, T] bool.
    """
    scaled = [
        np.asarray(c, dtype=np.float64)[:, None] / np.maximum(n, 1.0)[None, :]  # [U_r, T]
        for c, n in zip(counts_per_rank, norms)
    ]
    w = owned_sums(plan, rows_per_rank, scaled)  # [S, T]
    return w * owned_valid.astype(np.float64)


def _all_gather_ints(x: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return out


def exchange_batch(batch: Batch, table: NewsTable, device: torch.device | str) -> Batch:
    """This rank's per-rank ``batch`` (from ``collate``) turned into its share of the global
    batch: the owned titles' fields, indices into U_g and the owner's aux weights.

    Collective (two all-gathers of int64 on ``device``): every rank calls it once per
    micro-batch, in the same order.
    """
    rank = dist.get_rank()
    rows = batch.news_rows.to(torch.int64)
    counts = batch.hist_count.round().to(torch.int64)  # integer occurrence counts
    valid = batch.news_valid().to(torch.int64)  # [U, T]
    norms = (counts[:, None] * valid).sum(0)  # [T] N_r,t
    sizes = _all_gather_ints(torch.tensor([rows.numel()], dtype=torch.int64, device=device))
    sizes = [int(s) for s in sizes]
    width = max(sizes)
    packed = torch.zeros(len(NEWS_TASKS) + 2 * width, dtype=torch.int64)
    T = len(NEWS_TASKS)
    packed[:T] = norms
    packed[T : T + rows.numel()] = rows
    packed[T + width : T + width + rows.numel()] = counts
    gathered = [g.cpu().numpy() for g in _all_gather_ints(packed.to(device))]
    rows_r = [g[T : T + n] for g, n in zip(gathered, sizes)]
    counts_r = [g[T + width : T + width + n] for g, n in zip(gathered, sizes)]
    norms_r = np.stack([g[:T] for g in gathered]).astype(np.float64)  # [W, T]

    plan = plan_exchange(rows_r, rank)
    fields = news_fields(table, plan.owned)
    owned = replace(batch, **fields)  # per-news fields of the owned titles
    w = owner_weights(plan, rows_r, counts_r, norms_r, owned.news_valid().numpy())
    total = owned_sums(plan, rows_r, counts_r).astype(np.float32)  # [S]
    remap = torch.from_numpy(plan.remap)
    return replace(
        owned,
        hist_idx=remap[batch.hist_idx],
        cand_idx=remap[batch.cand_idx],
        hist_count=torch.from_numpy(total),  # occurrences over all ranks (informational)
        global_unique=int(plan.rows.size),
        aux_weight=torch.from_numpy(w),  # float64: the loss casts it to its own dtype
    )


def gather_news_vectors(owned_vecs: torch.Tensor, n_global: int) -> torch.Tensor:
    """Owned title vectors [S, D] of every rank -> the global unique rows' vectors [n, D].

    Differentiable: the backward sums each rank's gradient into the rank that encoded the title.
    """
    return torch.cat(all_gather(owned_vecs), dim=0)[:n_global]  # [W*S, D] -> [n, D]


def gather_news_ids(owned: torch.Tensor, n_global: int) -> torch.Tensor:
    """An integer per-news field of the owned titles [S] (e.g. ``Batch.category``) of every
    rank -> the global unique rows' values [n], for a model that reads a label of the titles its
    samples point at (MINER's category bias). Not differentiable (labels carry no gradient).

    Collective (one all-gather of S integers): every rank calls it in the same forward position.
    """
    return torch.cat(_all_gather_ints(owned.contiguous()), dim=0)[:n_global]  # [W*S] -> [n]
