"""``mtrec predict``: the leaderboard's ``prediction.zip`` for a split, from a run folder.

Scores come from the shared steps of :mod:`mtrec_dist.eval.driver`; each impression's ranks
follow the tie rule of the dev metrics (:func:`mtrec_dist.eval.metrics.ranks_of`), and its id is
written as the exact string the data stream gave.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from mtrec_dist.eval.driver import OnPart, iter_parts, result, run_split, say
from mtrec_dist.eval.metrics import ranks_of
from mtrec_dist.eval.submission import write_prediction
from mtrec_dist.utils import atomic_write_json


def predict(
    run_dir: str | Path | Sequence[str | Path],
    split: str = "test",
    out: str | Path = "prediction.zip",
    num_workers: int | None = None,
    on_part: OnPart | None = None,
) -> Path:
    """Write ``prediction.zip`` (``prediction.txt``: ``ImpressionID [r1,r2,...]`` per line).

    Also writes ``eval/<split>/prediction.json``, a record of how the file was made (model,
    data, per-stage seconds, per-worker memory). ``on_part`` as in ``driver.run_split``.
    Several run folders: the ensemble of their mean scores
    (:func:`mtrec_dist.eval.ensemble.predict_ensemble`; its record goes next to ``out``).
    """
    from mtrec_dist.eval.ensemble import as_runs, predict_ensemble

    runs = as_runs(run_dir)
    if len(runs) > 1:
        return predict_ensemble(runs, split, out, num_workers, on_part)
    r = run_split(runs[0], split, num_workers, need_labels=False, on_part=on_part)
    idx = r.index
    t0 = time.perf_counter()
    path = write_ranks(iter_parts(r), out, idx)
    stats = result(r, {"split": split, "impressions": int(idx["ids"].size), "out": str(path)})
    stats["seconds"]["merge"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(r.out_dir / "prediction.json", stats)
    say(f"wrote {path} ({idx['ids'].size} impressions)")
    return path


def write_ranks(
    parts: Iterable[dict[str, np.ndarray]], out: str | Path, index: dict[str, np.ndarray]
) -> Path:
    """The validated ``prediction.zip`` of scored parts (``ids``, ``sizes``, flat ``scores``)
    in the split's order, each impression ranked by the tie rule; written atomically."""

    def lines() -> Iterator[tuple[str, list[int]]]:
        for d in parts:
            ranks = ranks_of(d["scores"], d["sizes"]).tolist()
            start = 0
            for imp, size in zip(d["ids"].tolist(), d["sizes"].tolist()):
                yield imp, ranks[start : start + size]
                start += size

    return write_prediction(lines(), out, index["ids"].tolist(), index["sizes"].tolist())
