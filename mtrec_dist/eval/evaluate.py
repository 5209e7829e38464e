"""Dev metrics: ``mtrec evaluate`` on a run folder, and the trainer's in-memory evaluation.

Both report the metrics of exactly the ranks ``mtrec predict`` would write for the same scores
(:func:`mtrec_dist.eval.metrics.ranked_impression_metrics`: tied scores are ranked in candidate
order, the earlier candidate first), so a dev figure equals ``mtrec score`` of the prediction
file of the same run, ties included.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mtrec_dist.data.stream import eval_groups, rechunk, take
from mtrec_dist.eval.driver import OnPart, iter_parts, result, run_split
from mtrec_dist.eval.engine import Engine, encode_news_vectors, index_impressions, labeled_part
from mtrec_dist.eval.metrics import METRICS, summarize
from mtrec_dist.eval.pool import WorkerPool
from mtrec_dist.eval.run_folder import is_labeled, read_manifest, split_info
from mtrec_dist.utils import atomic_write_json, say

MEMORY_CHUNK = 50_000  # impressions held at once by evaluate_model (like one part)


def evaluate(
    run_dir: str | Path | Sequence[str | Path],
    split: str = "dev",
    num_workers: int | None = None,
    on_part: OnPart | None = None,
) -> dict:
    """AUC/MRR/nDCG@5/nDCG@10 of the run's exported model on a labeled split.

    Also writes ``eval/<split>/metrics.json``. Counts: ``impressions``, ``auc_skipped``
    (single-class impressions), ``no_click_skipped``, ``candidates_missing_news`` (candidates
    not in news.tsv, scored as the empty title), ``news_encoded`` (0 on a cache hit).
    ``on_part(k)`` is called after the k-th part newly scored (see ``driver.run_split``).
    Several run folders: the metrics of their mean scores
    (:func:`mtrec_dist.eval.ensemble.evaluate_ensemble`; no metrics.json written).
    """
    from mtrec_dist.eval.ensemble import as_runs, evaluate_ensemble

    runs = as_runs(run_dir)
    if len(runs) > 1:
        return evaluate_ensemble(runs, split, num_workers, on_part)
    r = run_split(runs[0], split, num_workers, need_labels=True, on_part=on_part)
    per = np.concatenate([d["metrics"] for d in iter_parts(r)]) if r.parts else np.zeros((0, 4))
    res = result(r, summarize(per))
    res["split"] = split
    atomic_write_json(r.out_dir / "metrics.json", res)
    say(f"{split}: " + ", ".join(f"{m} {res[m]:.4f}" for m in METRICS))
    return res


def evaluate_model(
    model: torch.nn.Module,
    prepared_dir: str | Path,
    split: str = "dev",
    max_impressions: int = 0,
    encode_batch: int = 256,
) -> dict:
    """Dev metrics of an in-memory model in this process (the trainer's periodic evaluation).

    The engine of :func:`evaluate` without files or Ray: the first ``max_impressions``
    impressions (0 = all), their news encoded once by the same routine, scored in batches of
    similar length; only the bookkeeping files and the worker processes are left out.
    """
    prepared = Path(prepared_dir)
    manifest = read_manifest(prepared)
    info = split_info(manifest, split, prepared)
    if not is_labeled(manifest, split, prepared):
        raise ValueError(f"{prepared}/manifest.json: split {split!r} has no labels")
    limit = max_impressions if max_impressions > 0 else None

    def chunks():  # MEMORY_CHUNK impressions at a time, read group by group
        return rechunk(take(eval_groups(prepared, split), 0, limit), MEMORY_CHUNK)

    was_training = model.training
    eng = Engine(model, prepared, split)
    stats: dict = {}
    try:
        if not eng.cross:
            rows = np.unique(
                np.concatenate(
                    [np.zeros(0, np.int64)] + [index_impressions(c)["rows"] for c in chunks()]
                )
            )
            pool = WorkerPool.in_process(eng)
            vectors, enc = encode_news_vectors(
                pool.map, eng.table, rows, encode_batch, progress=False
            )
            eng.set_vectors(None, vectors)
            stats["news_encoded"] = enc["news_encoded"]
        per = [labeled_part(chunk, eng.score_many(chunk))["metrics"] for chunk in chunks()]
    finally:
        model.train(was_training)
    res = summarize(np.concatenate(per) if per else np.zeros((0, 4)))
    res.update(stats)
    res["candidates_missing_news"] = int(info.get("stats", {}).get("candidates_missing_news", 0))
    return res
