"""Test-side reference computations and adapters the package itself does not need.

The oracles here compute the leaderboard's figures the simple way (one impression at a time,
Python's stable sort, pair counting for AUC, MIND's ``evaluate.py`` formulas for MRR and
nDCG), independently of the vectorised code under test in :mod:`mtrec_dist.metrics`
(docs/design.md §8). :func:`write_prediction` is the per-line form of the package's block
writer, an adapter that lets a test state a prediction as ``(id, ranks)`` pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice
from pathlib import Path

import numpy as np

from mtrec_dist.eval.submission import Block, PredictionError, write_prediction_blocks

LINES_PER_BLOCK = 8192  # lines per block handed to the block writer (a test may lower it)


def ranks_from_scores(scores: Sequence[float] | np.ndarray) -> list[int]:
    """1-based rank of each candidate (1 = highest score), a tie ranked in candidate order."""
    s = [float(x) for x in np.asarray(scores, dtype=np.float64).reshape(-1)]
    order = sorted(range(len(s)), key=lambda j: -s[j])  # Python's sort is stable
    rank = [0] * len(s)
    for r, j in enumerate(order, start=1):
        rank[j] = r
    return rank


def ranks_grouped(scores: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Flat ranks of flat scores of impressions with ``sizes`` candidates, one at a time."""
    out: list[int] = []
    start = 0
    for n in np.asarray(sizes, dtype=np.int64).tolist():
        out += ranks_from_scores(np.asarray(scores)[start : start + n])
        start += n
    return np.asarray(out, dtype=np.int64)


def _one_impression(y: np.ndarray, s: np.ndarray) -> list[float]:
    """(auc, mrr, ndcg@5, ndcg@10) of one impression, NaN where undefined (MIND's formulas)."""
    n = len(y)
    pos, neg = [j for j in range(n) if y[j] == 1], [j for j in range(n) if y[j] != 1]
    if pos and neg:  # pairs ordered correctly, a tie counting 1/2
        won = sum(1.0 if s[i] > s[k] else 0.5 if s[i] == s[k] else 0.0 for i in pos for k in neg)
        auc = won / (len(pos) * len(neg))
    else:
        auc = float("nan")
    if not pos:
        return [auc, float("nan"), float("nan"), float("nan")]
    order = sorted(range(n), key=lambda j: -float(s[j]))  # stable: a tie in candidate order
    y_ranked = np.asarray([y[j] for j in order], dtype=np.float64)
    mrr = float(np.sum(y_ranked / (np.arange(n) + 1)) / np.sum(y_ranked))
    ideal = np.sort(np.asarray(y, dtype=np.float64))[::-1]

    def dcg(gains_by_rank: np.ndarray, k: int) -> float:
        g = 2.0 ** gains_by_rank[:k] - 1.0
        return float(np.sum(g / np.log2(np.arange(len(g)) + 2.0)))

    return [auc, mrr, dcg(y_ranked, 5) / dcg(ideal, 5), dcg(y_ranked, 10) / dcg(ideal, 10)]


def compute_metrics_lists(labels: list, scores: list) -> dict:
    """AUC, MRR, nDCG@5, nDCG@10 averaged over the impressions where each is defined, from one
    label list and one score list per impression, plus the counts of the skipped ones."""
    if [len(s) for s in scores] != [len(y) for y in labels]:
        raise ValueError("every impression needs as many scores as labels")
    rows = np.asarray(
        [
            _one_impression(np.asarray(y, dtype=np.float64), np.asarray(s, dtype=np.float64))
            for y, s in zip(labels, scores)
        ],
        dtype=np.float64,
    ).reshape(-1, 4)
    out: dict = {}
    for j, name in enumerate(("auc", "mrr", "ndcg@5", "ndcg@10")):
        col = rows[:, j][~np.isnan(rows[:, j])]
        out[name] = float(col.mean()) if col.size else float("nan")
    out["impressions"] = int(rows.shape[0])
    out["auc_skipped"] = int(np.isnan(rows[:, 0]).sum())
    out["no_click_skipped"] = int(np.isnan(rows[:, 1]).sum())
    return out


def _line_blocks(lines: Iterable[tuple[str, Sequence[int]]]) -> Iterator[Block]:
    """``(id, ranks)`` pairs -> blocks of :data:`LINES_PER_BLOCK` lines."""
    it = iter(lines)
    while chunk := list(islice(it, LINES_PER_BLOCK)):
        ranks = [r.tolist() if isinstance(r, np.ndarray) else list(r) for _, r in chunk]
        flat = np.asarray(list(chain.from_iterable(ranks)))
        if flat.size and flat.dtype.kind not in "iu":
            bad = next(imp for imp, r in zip(chunk, ranks) if np.asarray(r).dtype.kind not in "iu")
            raise PredictionError(
                f"impression {bad[0]}: ranks {ranks[chunk.index(bad)][:20]} are not integers"
            )
        ids = np.asarray([str(imp) for imp, _ in chunk])
        yield ids, np.fromiter(map(len, ranks), dtype=np.int64, count=len(chunk)), flat


def write_prediction(
    lines: Iterable[tuple[str, Sequence[int]]],
    out_zip_path: str | Path,
    expected_ids: Sequence[str] | None = None,
    expected_sizes: Sequence[int] | None = None,
) -> Path:
    """``(impression_id, ranks)`` pairs through the package's block writer (same checks, same
    errors naming the impression, same atomic write)."""
    return write_prediction_blocks(_line_blocks(lines), out_zip_path, expected_ids, expected_sizes)
