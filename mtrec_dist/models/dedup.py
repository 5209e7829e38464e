"""Title de-duplication across ranks (``data.dedup=global``), in one room: the ownership plan,
the integer exchange, the owner weights, and the two functions through which a model reads a
batch the same way in both modes (docs/design.md §2.6 Cross-rank de-duplication).

What a model sees. A :class:`~mtrec_dist.data.batch.Batch`'s per-news fields (``news_rows``,
``tokens``, ``category``, ...) are always the titles THIS rank encodes; ``hist_idx`` /
``cand_idx`` always index the rows that :func:`news_vectors` returns. A model therefore:

- encodes its titles and calls ``news_vectors(vecs, batch)`` (and ``news_ids(ids, batch)`` for an
  integer per-news field its scorer reads): the identity on a per-rank batch (``collate``), the
  differentiable gather on a rank's share of the global batch (:func:`exchange_batch`);
- reduces a per-news auxiliary loss with ``news_loss_weights(batch, task, dtype).reduce(l)``:
  the occurrence-weighted mean over this rank's history on a per-rank batch, the owner's
  explicitly weighted sum on a global one; summed over ranks both give the same gradient.

Nothing else in a model depends on the mode. The registry decides it
(``models/registry.py global_dedup``, from the model's ``global_dedup`` capability) and the
training loop calls :func:`exchange_batch` on each micro-batch when it is on.

Why. Per-rank de-duplication (``collate``) encodes each distinct title of a rank's
micro-batch once; at 8-16 ranks the same popular titles are still encoded on every rank. Here,
per micro-batch:

1. One exchange of integers: every rank all-gathers every rank's unique news rows, their
   history-occurrence counts ``c_r(u)`` and its per-task normalisers
   ``N_r,t = sum_u c_r(u) valid_t(u)`` (:func:`exchange_batch`).
2. A pure plan (:func:`plan_exchange`): the sorted union ``U_g`` of the rows is split into W
   contiguous shares of ``S = ceil(|U_g| / W)``; rank k owns ``U_g[k*S : (k+1)*S]``, the last
   shares padded with row 0 (the empty pad title), so every rank encodes exactly S titles (the
   all-gather needs equal sizes). Because the split is contiguous, ``U_g[i]`` lands at position
   i of the gathered ``[W*S, D]`` tensor and dropping the pads is ``[:|U_g|]``. Each rank
   remaps its own ``hist_idx`` / ``cand_idx`` to indices of ``U_g``.
3. The model encodes its S titles and :func:`news_vectors` all-gathers them with
   ``torch.distributed.nn.functional.all_gather`` (:func:`gather_news_vectors`), whose
   backward sums the gradients of every rank into the owner (reduce-scatter with SUM on NCCL;
   all-to-all then a sum on gloo; both read in torch 2.13's
   ``torch/distributed/nn/functional.py``). Plain ``dist.all_gather`` would return tensors
   without a gradient. The main loss stays the mean over this rank's real samples, so
   DeepSpeed's average over ranks gives exactly the per-rank path's gradient. A model that
   also reads an integer field of the titles its samples point at (MINER's category bias reads
   their categories) gathers it with :func:`news_ids` (:func:`gather_news_ids`).
4. Per-news auxiliary losses are computed once, on the owner, as ``sum_u w_t(u) l_t(u)`` with
   ``w_t(u) = valid_t(u) * sum_r c_r(u) / max(N_r,t, 1)`` (:func:`owner_weights`, float64,
   cast to the loss's dtype only inside the loss): summed over ranks this is ``sum_r L_r,t`` of
   the per-rank path (:func:`loss_weights`), so the average DeepSpeed applies is the same.

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

from mtrec_dist.data.batch import Batch, NewsTable, news_fields
from mtrec_dist.tasks import NEWS_COLUMN, NEWS_TASKS


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


# --------------------------------------------------------------------- what a model calls


def news_vectors(owned_vecs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The vectors ``batch.hist_idx`` / ``cand_idx`` index, from those of the titles this rank
    encoded: ``owned_vecs`` [U, D] itself on a per-rank batch, the global unique rows'
    vectors [U_g, D] (:func:`gather_news_vectors`, differentiable) on a rank's share.

    Collective on a global batch: every rank calls it in the same forward position.
    """
    if not batch.global_unique:
        return owned_vecs
    return gather_news_vectors(owned_vecs, batch.global_unique)


def news_ids(owned_ids: torch.Tensor, batch: Batch) -> torch.Tensor:
    """An integer per-news field [U] of the titles this rank encodes (e.g. ``batch.category``)
    for the rows ``batch.hist_idx`` / ``cand_idx`` index: itself on a per-rank batch, every
    rank's share gathered ([U_g], :func:`gather_news_ids`) on a global one."""
    if not batch.global_unique:
        return owned_ids
    return gather_news_ids(owned_ids, batch.global_unique)


@dataclass(frozen=True)
class NewsLossWeights:
    """How one per-news auxiliary loss [U] reduces to this rank's scalar, in either mode.

    ``norm`` set (per-rank batch): ``sum_u w(u) l(u) / norm`` with occurrence counts ``w`` and
    ``norm = max(sum_u w(u), 1)``, the mean over history occurrences of valid news (0, still on
    the graph, when there is none). ``norm`` None (global batch): the owner weights
    (:func:`owner_weights`, float64) already hold every rank's normaliser; they are cast to the
    loss's dtype and the loss is ``sum_u w(u) l(u)``.
    """

    weight: torch.Tensor  # [U]
    norm: torch.Tensor | None  # [] or None (owner weights)

    def reduce(self, per_news: torch.Tensor) -> torch.Tensor:
        """per_news [U] -> this rank's loss (a scalar)."""
        if self.norm is None:
            return (self.weight.to(per_news.dtype) * per_news).sum()
        return (self.weight * per_news).sum() / self.norm


def loss_weights(
    hist_count: torch.Tensor, valid: torch.Tensor, owner_weight: torch.Tensor | None = None
) -> NewsLossWeights:
    """The weights from explicit parts: occurrence counts ``hist_count`` [U] of the news with a
    label (``valid`` [U] bool), or, when given, the owner weights ``owner_weight`` [U]."""
    if owner_weight is not None:
        return NewsLossWeights(owner_weight, None)
    w = hist_count * valid.to(hist_count.dtype)  # [U]
    return NewsLossWeights(w, w.sum().clamp_min(1.0))


def news_loss_weights(batch: Batch, task: str, dtype: torch.dtype) -> NewsLossWeights:
    """The weights of per-news task ``task`` (``data.tasks.NEWS_TASKS``) over the titles this
    rank encodes: occurrence counts (cast to ``dtype``, the model's) of the valid news on a
    per-rank batch, the owner weights on a rank's share of the global batch."""
    column = NEWS_COLUMN[task]
    if batch.global_unique:
        return NewsLossWeights(batch.aux_weight[:, column], None)  # [S], float64
    return loss_weights(batch.hist_count.to(dtype), batch.news_valid()[:, column])
