"""``mtrec predict``: the leaderboard's ``prediction.zip`` for a split, from a run folder.

Scores come from the shared steps of :mod:`mtrec_dist.eval.driver` (one run, or the mean of
several: an ensemble, :mod:`mtrec_dist.eval.ensemble`); each impression's ranks
follow the tie rule of the dev metrics (:func:`mtrec_dist.metrics.ranks_of`), and its id is
written as the exact string the data stream gave.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from mtrec_dist.eval.driver import OnPart, score_split
from mtrec_dist.eval.submission import Block, write_prediction_blocks
from mtrec_dist.metrics import ranks_of
from mtrec_dist.utils import atomic_write_json, say


def predict(
    run_dir: str | Path | Sequence[str | Path],
    split: str = "test",
    out: str | Path = "prediction.zip",
    num_workers: int | None = None,
    on_part: OnPart | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Write ``prediction.zip`` (``prediction.txt``: ``ImpressionID [r1,r2,...]`` per line).

    Also writes ``eval/<split>/prediction.json``, a record of how the file was made (model,
    data, device, per-stage seconds, per-worker memory). ``on_part`` as in
    ``driver.run_split``; ``overrides``: ``eval.*`` settings of this call, e.g.
    ``eval.device=cuda`` (docs/design.md §8.5).
    Several run folders: the ranks of their mean scores; the ensemble has no run folder of its
    own, so its record goes next to ``out`` (``<out stem>.json``: runs, per-run figures).
    """
    s = score_split(
        run_dir, split, num_workers, need_labels=False, on_part=on_part, overrides=overrides
    )
    n = int(s.index["ids"].size)
    t0, c0 = time.perf_counter(), time.process_time()
    merge: dict[str, float] = {}
    path = write_ranks(s.parts(), out, s.index, merge)
    stats = {"split": split, "impressions": n, "out": str(path)}
    total = time.perf_counter() - t0
    if s.ensemble:
        stats["seconds"] = {"merge": round(total, 3)}
        stats["merge_seconds"] = merge_stages(total, merge)
        atomic_write_json(path.with_name(path.stem + ".json"), s.record(stats))
        say(f"wrote {path} ({n} impressions, mean of {len(s.runs)} runs)")
        return path
    stats = s.record(stats)
    stats["seconds"]["merge"] = round(total, 3)
    stats["cpu_seconds"]["merge"] = round(time.process_time() - c0, 3)  # this process only
    stats["merge_seconds"] = merge_stages(total, merge)
    atomic_write_json(s.splits[0].out_dir / "prediction.json", stats)
    say(f"wrote {path} ({n} impressions)")
    return path


def write_ranks(
    parts: Iterable[dict[str, np.ndarray]],
    out: str | Path,
    index: dict[str, np.ndarray],
    seconds: dict[str, float] | None = None,
) -> Path:
    """The validated ``prediction.zip`` of scored parts (``ids``, ``sizes``, flat ``scores``)
    in the split's order, each impression ranked by the tie rule; written atomically, a part
    at a time (:func:`~mtrec_dist.eval.submission.write_prediction_blocks`). ``seconds``
    receives ``rank`` (ranking) and ``write`` (checks, formatting, deflate) seconds."""
    seconds = {} if seconds is None else seconds
    seconds.setdefault("rank", 0.0)

    def blocks() -> Iterator[Block]:
        for d in parts:
            t0 = time.perf_counter()
            ranks = ranks_of(d["scores"], d["sizes"])
            seconds["rank"] += time.perf_counter() - t0
            yield d["ids"], d["sizes"], ranks

    return write_prediction_blocks(blocks(), out, index["ids"], index["sizes"], seconds)


def merge_stages(total: float, seconds: dict[str, float]) -> dict[str, float]:
    """The merge's seconds by stage: ``read_parts`` (loading and checking the part files: the
    rest of ``total``), ``rank``, ``write`` (checks, formatting, deflate)."""
    out = {"read_parts": total - seconds.get("rank", 0.0) - seconds.get("write", 0.0)}
    out |= {k: seconds.get(k, 0.0) for k in ("rank", "write")}
    return {k: round(v, 3) for k, v in out.items()}
