"""Dev metrics: ``mtrec evaluate`` on a run folder, and the trainer's in-memory evaluation.

Both report the metrics of exactly the ranks ``mtrec predict`` would write for the same scores
(:func:`mtrec_dist.metrics.ranked_impression_metrics`: tied scores are ranked in candidate
order, the earlier candidate first), so a dev figure equals ``mtrec score`` of the prediction
file of the same run, ties included.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mtrec_dist.data.stream import eval_groups, rechunk, take
from mtrec_dist.eval.driver import OnPart, encode_news_vectors, score_split
from mtrec_dist.eval.engine import Engine, index_impressions, labeled_part
from mtrec_dist.eval.pool import WorkerPool
from mtrec_dist.eval.run_folder import is_labeled, read_manifest, split_info
from mtrec_dist.metrics import METRICS, summarize
from mtrec_dist.utils import atomic_write_json, say

MEMORY_CHUNK = 50_000  # impressions held at once by evaluate_model (like one part)


def evaluate(
    run_dir: str | Path | Sequence[str | Path],
    split: str = "dev",
    num_workers: int | None = None,
    on_part: OnPart | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """AUC/MRR/nDCG@5/nDCG@10 of the run's exported model on a labeled split.

    Also writes ``eval/<split>/metrics.json``. Counts: ``impressions``, ``auc_skipped``
    (single-class impressions), ``no_click_skipped``, ``candidates_missing_news`` (candidates
    not in news.tsv, scored as the empty title), ``news_encoded`` (0 on a cache hit).
    ``on_part(k)`` is called after the k-th part newly scored (see ``driver.run_split``).
    ``overrides``: ``eval.*`` settings of this call, e.g. ``eval.device=cuda``,
    ``eval.bf16=true`` (docs/design.md §8.5).
    Several run folders: the metrics of their mean scores, ranked by the same tie rule (==
    ``mtrec score`` of ``mtrec predict``'s file for the same runs); no metrics.json written,
    the ensemble having no run folder of its own.
    """
    s = score_split(
        run_dir, split, num_workers, need_labels=True, on_part=on_part, overrides=overrides
    )
    per = [d["metrics"] for d in s.parts()]
    res = s.record(summarize(np.concatenate(per) if per else np.zeros((0, 4))))
    res["split"] = split
    res["candidates_missing_news"] = s.candidates_missing_news  # a run's record has it already
    if s.ensemble:
        say(f"{split} (mean of {len(s.runs)} runs): " + _line(res))
        return res
    atomic_write_json(s.splits[0].out_dir / "metrics.json", res)
    say(f"{split}: " + _line(res))
    return res


def _line(res: dict) -> str:
    return ", ".join(f"{m} {res[m]:.4f}" for m in METRICS)


def evaluate_model(
    model: torch.nn.Module,
    prepared_dir: str | Path,
    split: str = "dev",
    max_impressions: int = 0,
    encode_batch: int = 256,
    bf16: bool = False,
) -> dict:
    """Dev metrics of an in-memory model in this process (the trainer's periodic evaluation).

    The engine of :func:`evaluate` without files or Ray: the first ``max_impressions``
    impressions (0 = all), their news encoded once by the same routine, scored in batches of
    similar length; only the bookkeeping files and the worker processes are left out. It
    computes on the model's own device (the training GPU; docs/design.md §8.5), encoding news
    under bf16 autocast when ``bf16``.
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
    eng = Engine(model, prepared, split, bf16=bf16)
    stats: dict = {}
    try:
        if not eng.cross:
            rows = np.unique(
                np.concatenate(
                    [np.zeros(0, np.int64)] + [index_impressions(c)["rows"] for c in chunks()]
                )
            )
            pool = WorkerPool.in_process(eng)
            vectors, enc = encode_news_vectors(pool, eng.table, rows, encode_batch, progress=False)
            eng.set_vectors(None, vectors)
            stats["news_encoded"] = enc["news_encoded"]
        per = [labeled_part(chunk, eng.score_many(chunk))["metrics"] for chunk in chunks()]
    finally:
        model.train(was_training)
    res = summarize(np.concatenate(per) if per else np.zeros((0, 4)))
    res.update(stats)
    res["candidates_missing_news"] = int(info.get("stats", {}).get("candidates_missing_news", 0))
    return res
