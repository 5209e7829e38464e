"""Per-impression ranking metrics, averaged over impressions, as the MIND competition scores them.

Definitions (MIND's ``evaluate.py``: ``roc_auc_score``, ``mrr_score``, ``ndcg_score``), for one
impression with labels ``y`` (0/1) and scores ``s`` over its ``n`` candidates:

* **AUC** = Mann-Whitney U / (P * N): the fraction of (clicked, non-clicked) pairs ordered
  correctly, a tie counting 1/2. Identical to ``sklearn.metrics.roc_auc_score``.
* **MRR** = sum over clicked candidates of 1/rank, divided by the number of clicked candidates.
* **nDCG@k** = DCG@k / ideal DCG@k with gain ``2**y - 1`` and discount ``log2(rank + 1)``.

Ranks for MRR/nDCG come from a *stable* sort by descending score: tied candidates keep their
order in the impression (MIND's ``np.argsort(s)[::-1]`` breaks ties arbitrarily — the reverse
of candidate order with numpy's default quicksort on small arrays — so results on tied
scores may differ from MIND's by construction; on tie-free scores they are identical).

**The tie rule of everything we report** (:func:`ranked_impression_metrics`): a model's scores
are first turned into the ranks ``prediction.txt`` would carry (:func:`stable_ranks`: 1 = highest
score, tied candidates ranked in candidate order, the earlier one better), and the metrics are
MIND's on ``score = -rank``, exactly what the leaderboard computes from a submission. So a dev
figure of ``mtrec evaluate``, the trainer's dev figure, the synthetic generator's ceiling and
``mtrec score`` of the prediction file of the same scores all agree, ties or not; on tie-free
scores it equals MIND's metrics on the raw scores. (AUC on raw tied scores would give each tied
pair 1/2 — the submission cannot express a tie, so a dev figure computed that way could not be
reproduced by any prediction file.)

Undefined values, and how they are handled (counted in the output, never silently dropped):

* an impression whose labels are all 0 or all 1 has no AUC (``roc_auc_score`` raises on one
  class); it is **skipped for AUC** and counted in ``auc_skipped``;
* an impression without any click has an ideal DCG of 0 and an MRR of 0/0; it is **skipped for
  MRR and nDCG** and counted in ``no_click_skipped``. (MIND guarantees >= 1 click per labeled
  impression, so neither happens on MIND's own dev set, except all-clicked impressions for AUC.)

Why grouped by candidate count: MIND-large dev has 376k impressions; a Python loop per
impression (or worse, per candidate) would dominate evaluation. Impressions with the same
candidate count form one ``[m, n]`` matrix and every metric is a handful of numpy operations
on it; there are only a few hundred distinct counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mtrec_dist.utils import offsets_of

METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10")


def groups_by_size(sizes: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(n, impression_indices [m], flat_indices [m, n])`` per distinct candidate count.

    ``flat_indices[i, j]`` is the position of candidate ``j`` of impression ``impression_indices[i]``
    in the flat arrays, so ``flat[flat_indices]`` is the ``[m, n]`` matrix of that group.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and sizes.min() < 0:
        raise ValueError("candidate counts must be >= 0")
    starts = offsets_of(sizes)[:-1]
    for n in np.unique(sizes):
        idx = np.flatnonzero(sizes == n)
        yield int(n), idx, starts[idx, None] + np.arange(n, dtype=np.int64)[None, :]


def stable_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every candidate, row-wise ([m, n] -> [m, n] int64), 1 = highest score.

    Ties are broken by candidate order (a stable sort of the negated scores).
    """
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, axis=1, kind="stable")  # [m, n] candidate at each rank
    ranks = np.empty_like(order)
    rows = np.arange(s.shape[0])[:, None]
    ranks[rows, order] = np.arange(1, s.shape[1] + 1)[None, :]
    return ranks


def _auc_matrix(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per row of ``[m, n]`` matrices (NaN where one class is absent).

    AUC = (sum of the positives' mid-ranks - P(P+1)/2) / (P N), mid-ranks = average ascending
    rank of each tie group: exactly the "ties count 1/2" pair count.
    """
    m, n = scores.shape
    order = np.argsort(scores, axis=1, kind="stable")  # ascending
    rows = np.arange(m)[:, None]
    s_sorted = scores[rows, order]
    y_sorted = labels[rows, order]
    pos = np.arange(n, dtype=np.int64)[None, :].repeat(m, axis=0)
    new_group = np.ones((m, n), dtype=bool)
    new_group[:, 1:] = s_sorted[:, 1:] != s_sorted[:, :-1]
    first = np.maximum.accumulate(np.where(new_group, pos, 0), axis=1)  # group's first index
    end_group = np.ones((m, n), dtype=bool)
    end_group[:, :-1] = new_group[:, 1:]
    last = np.minimum.accumulate(np.where(end_group, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    mid_rank = (first + last) / 2.0 + 1.0  # 1-based average rank of the tie group
    p = y_sorted.sum(axis=1)
    q = n - p
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((mid_rank * y_sorted).sum(axis=1) - p * (p + 1) / 2.0) / (p * q)
    auc[(p == 0) | (q == 0)] = np.nan
    return auc


def _dcg_at(gains_by_rank: np.ndarray, k: int) -> np.ndarray:
    """DCG@k of gains already ordered by rank ([m, n] -> [m])."""
    g = gains_by_rank[:, :k]
    return (g / np.log2(np.arange(g.shape[1]) + 2.0)[None, :]).sum(axis=1)


def impression_metrics_matrix(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Metrics of ``m`` impressions with ``n`` candidates each: ``[m, n]`` -> ``[m, 4]``.

    Columns follow :data:`METRICS`; NaN marks an undefined value (see the module docstring).
    """
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; a model produced an invalid score")
    m, n = y.shape
    out = np.full((m, 4), np.nan)
    if n == 0:
        return out
    out[:, 0] = _auc_matrix(y, s)
    order = np.argsort(-s, axis=1, kind="stable")  # [m, n] candidate at each rank
    y_ranked = np.take_along_axis(y, order, axis=1)
    clicks = y.sum(axis=1)
    has_click = clicks > 0
    rr = (y_ranked / np.arange(1, n + 1)[None, :]).sum(axis=1)
    gains = 2.0**y_ranked - 1.0
    ideal = 2.0 ** np.sort(y, axis=1)[:, ::-1] - 1.0  # gains of the ideal order
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, 1] = rr / clicks
        out[:, 2] = _dcg_at(gains, 5) / _dcg_at(ideal, 5)
        out[:, 3] = _dcg_at(gains, 10) / _dcg_at(ideal, 10)
    out[~has_click, 1:] = np.nan
    return out


def impression_metrics(labels: np.ndarray, scores: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per-impression metrics ``[m, 4]`` (NaN = undefined) from flat candidate arrays.

    ``labels``/``scores`` hold the candidates of all impressions back to back (``[sum sizes]``),
    ``sizes[i]`` = candidate count of impression ``i``.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if labels.shape != (total,) or scores.shape != (total,):
        raise ValueError(
            f"expected flat labels and scores of {total} candidates (sum of sizes), got "
            f"{labels.shape} and {scores.shape}"
        )
    out = np.full((len(sizes), 4), np.nan)
    for _, idx, flat in groups_by_size(sizes):
        out[idx] = impression_metrics_matrix(labels[flat], scores[flat])
    return out


def ranked_impression_metrics(
    labels: np.ndarray, scores: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """Per-impression metrics ``[m, 4]`` of the ranks a submission would carry (the tie rule).

    Scores -> :func:`stable_ranks` per impression -> :func:`impression_metrics` on ``-rank``:
    identical to scoring the ``prediction.txt`` written from these scores.
    """
    scores = np.asarray(scores)
    if scores.size and np.isnan(scores.astype(np.float64)).any():
        raise ValueError("scores contain NaN; a model produced an invalid score")
    return impression_metrics(labels, -ranks_of(scores, sizes).astype(np.float64), sizes)


def ranks_of(scores: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Flat 1-based ranks of flat scores of impressions with ``sizes`` candidates (per impression,
    :func:`stable_ranks`' tie rule), vectorised by candidate count."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.empty(scores.shape, dtype=np.int64)
    for _, _, flat in groups_by_size(sizes):
        out[flat] = stable_ranks(scores[flat])
    return out


def summarize(per_impression: np.ndarray) -> dict:
    """Average the rows of :func:`impression_metrics` over impressions where each is defined.

    Returns the four metrics plus ``impressions`` (all), ``auc_skipped`` (single-class
    impressions, no AUC) and ``no_click_skipped`` (no click: no MRR/nDCG).
    """
    pm = np.asarray(per_impression, dtype=np.float64).reshape(-1, 4)
    out: dict = {}
    for j, name in enumerate(METRICS):
        col = pm[:, j]
        ok = ~np.isnan(col)
        out[name] = float(col[ok].mean()) if ok.any() else float("nan")
    out["impressions"] = int(pm.shape[0])
    out["auc_skipped"] = int(np.isnan(pm[:, 0]).sum())
    out["no_click_skipped"] = int(np.isnan(pm[:, 1]).sum())
    return out


def compute_metrics(labels: np.ndarray, scores: np.ndarray, sizes: np.ndarray) -> dict:
    """AUC, MRR, nDCG@5, nDCG@10 averaged over impressions (flat arrays + candidate counts),
    on the raw scores (a tie counts 1/2 in AUC). What we report uses :func:`ranked_metrics`."""
    return summarize(impression_metrics(labels, scores, sizes))


def ranked_metrics(labels: np.ndarray, scores: np.ndarray, sizes: np.ndarray) -> dict:
    """:func:`compute_metrics` under the tie rule: the metrics of the submission's ranks."""
    return summarize(ranked_impression_metrics(labels, scores, sizes))
