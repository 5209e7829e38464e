"""The steps ``mtrec evaluate`` and ``mtrec predict`` share: a split scored part by part on the
workers, with every intermediate result in the run folder so a restart redoes nothing
(docs/design.md §8.3 Parts and resume). :func:`score_split` takes a list of runs: one run is
the list of one, several are an ensemble (:mod:`mtrec_dist.eval.ensemble`: their mean scores).

1. **Index** the split (one pass over its shards, one shard per work unit): impression ids,
   candidate counts and the news rows the split needs (history ∪ candidates). Cached in
   ``eval/<split>/index-<data key[:16]>-v<PART_FORMAT>.npz`` (it depends on the data only).
2. **Encode** those news once (bi-encoders, :func:`encode_news_vectors`, docs/design.md §8.4)
   into ``eval/<split>/news_vectors-<model sha256[:16]>.npy`` (+ a ``.json`` sidecar); a cache
   hit encodes nothing. Cross-encoders (UNBERT) skip this step.
3. **Score** the impressions in fixed parts of ``eval.impressions_per_part`` (part k = the
   split's impressions ``[k P, (k+1) P)`` in behaviors order, whatever the number of workers),
   each written atomically to ``eval/<split>/parts/part-NNNNN.npz``. A part whose stored key
   (model, data, bounds, format) matches is skipped on a restart.
4. **Merge**: :meth:`SplitScores.parts` reads the parts in order, checked against the index
   (the runs' mean for an ensemble); :mod:`~mtrec_dist.eval.evaluate` averages their metrics,
   :mod:`~mtrec_dist.eval.predict` writes ``prediction.zip``.

Imports run one way: predict/evaluate → driver → pool, ensemble → engine (docs/design.md §8.1).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrec_dist.data.batch import NewsTable
from mtrec_dist.eval.engine import (
    PART_FORMAT,
    SCORE_BATCH,
    Engine,
    PartSpec,
    atomic_save_npy,
    atomic_save_npz,
    data_key,
    encode_chunks,
    plan_parts,
)
from mtrec_dist.eval.ensemble import COMBINE, check_ensemble, mean_parts
from mtrec_dist.eval.pool import WorkerPool, device_workers, resolve_device
from mtrec_dist.eval.run_folder import is_labeled, load_run, split_info
from mtrec_dist.metrics import ranked_impression_metrics
from mtrec_dist.utils import Progress, atomic_write_json

OnPart = Callable[[int], None]  # called with the number of parts written so far in this call


@dataclass
class SplitRun:
    """What the merge needs: the parts, where they are, the split's index and the records."""

    parts: list[PartSpec]
    out_dir: Path
    index: dict[str, np.ndarray]
    labeled: bool
    split_info: dict
    stats: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def score_split(
    run_dir: str | Path | Sequence[str | Path],
    split: str,
    num_workers: int | None,
    need_labels: bool,
    on_part: OnPart | None = None,
    overrides: Sequence[str] = (),
) -> SplitScores:
    """Steps 1-3 (:func:`run_split`) of each run in turn, the runs given as one folder or a
    list. Several runs are checked first (:func:`~mtrec_dist.eval.ensemble.check_ensemble`:
    nothing is scored on a refusal; a single run is checked by ``load_run``), then their
    split's impressions compared. ``overrides``: ``eval.*`` settings for every run
    (``eval.device=cuda``, ``eval.bf16=true``; ``load_run``)."""
    runs = as_runs(run_dir)
    if len(runs) > 1:
        check_ensemble(runs, split)
    done = [run_split(r, split, num_workers, need_labels, on_part, overrides) for r in runs]
    a = done[0].index
    for run, r in zip(runs[1:], done[1:]):
        if not (
            np.array_equal(a["ids"], r.index["ids"])
            and np.array_equal(a["sizes"], r.index["sizes"])
        ):
            raise RuntimeError(f"{runs[0]} and {run}: the split's impressions differ")
    return SplitScores(runs, done, with_metrics=need_labels)


@dataclass
class SplitScores:
    """A split's scores from one run, or the mean of several (an ensemble), as the merge
    reads them: ``parts()`` are parts in the split's order, each with ``ids``, ``sizes``,
    ``scores`` and, on a labeled split read for metrics, ``labels`` and ``metrics``."""

    runs: list[Path]
    splits: list[SplitRun]  # each run's steps 1-3, in the order of ``runs``
    with_metrics: bool  # an ensemble's mean parts get their metrics (a run's parts have them)

    @property
    def ensemble(self) -> bool:
        return len(self.runs) > 1

    @property
    def index(self) -> dict[str, np.ndarray]:
        """The split's index (every run's is the same; checked by :func:`score_split`)."""
        return self.splits[0].index

    @property
    def candidates_missing_news(self) -> int:
        return _missing_news(self.splits[0])

    def parts(self) -> Iterator[dict[str, np.ndarray]]:
        if not self.ensemble:
            yield from iter_parts(self.splits[0])
            return
        for d in mean_parts(self.runs, [iter_parts(r) for r in self.splits]):
            if self.with_metrics:
                d["metrics"] = ranked_impression_metrics(d["labels"], d["scores"], d["sizes"])
            yield d

    def record(self, stats: dict) -> dict:
        """The record of this call: a run's own figures (:func:`result`), or for an ensemble
        the runs, how they were combined and each run's figures."""
        if not self.ensemble:
            return result(self.splits[0], stats)
        out = dict(stats)
        out["runs"] = [str(r) for r in self.runs]
        out["combine"] = COMBINE
        out["per_run"] = [result(r, {"run": str(p)}) for p, r in zip(self.runs, self.splits)]
        return out


def as_runs(run_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    """One run folder or several -> a list of paths."""
    if isinstance(run_dir, (str, Path)):
        return [Path(run_dir)]
    runs = [Path(r) for r in run_dir]
    if not runs:
        raise ValueError("no run folder given")
    return runs


def run_split(
    run_dir: str | Path,
    split: str,
    num_workers: int | None,
    need_labels: bool,
    on_part: OnPart | None = None,
    overrides: Sequence[str] = (),
) -> SplitRun:
    """Steps 1-3 for the run's exported model on ``split``.

    ``on_part(k)`` runs on the driver after the k-th part newly written in this call (a hook
    for progress; the restart test stops the run from it). The device is ``eval.device``'s
    (docs/design.md §8.5): on ``cuda`` one worker per GPU, ``num_workers`` applying to the
    CPU only. bf16 vectors (``eval.bf16``) are cached apart from the exact fp32 ones, and
    parts scored from them carry that in their key.
    """
    run_dir = Path(run_dir)
    model, cfg, manifest, model_sha = load_run(run_dir, overrides)
    device = resolve_device(cfg.eval.device)
    bf16 = bool(cfg.eval.bf16)
    prepared = cfg.prepared_dir
    info = split_info(manifest, split, prepared)
    labeled = is_labeled(manifest, split, prepared)
    if need_labels and not labeled:
        raise ValueError(
            f"{prepared}/manifest.json: split {split!r} has no labels; use `mtrec predict` "
            "for an unlabeled split"
        )
    dkey = data_key(manifest, split)
    out_dir = run_dir / "eval" / split
    parts = plan_parts(manifest, split, cfg.eval.impressions_per_part)
    n = device_workers(device, int(num_workers or cfg.eval.num_workers))
    n = min(n, max(len(parts), len(info["shards"]), 1))

    def local() -> Engine:  # the one worker, in this process, on the device
        return Engine(model.to(device), prepared, split, bf16=bf16)

    pool = WorkerPool(n, run_dir, split, local, device=device, bf16=bf16)
    stats: dict[str, Any] = {"workers": n, "model_sha256": model_sha, "device": device}
    if bf16:
        stats["bf16"] = True
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), pool.cpu_seconds()
        yield
        seconds[name] = time.perf_counter() - t0
        cpu[name] = pool.cpu_seconds() - c0

    try:
        with _torch_threads(1) if n == 1 else contextlib.nullcontext():
            with stage("index"):
                index = _load_index(
                    pool, len(info["shards"]), split, out_dir / f"index-{dkey[:16]}"
                )
            if not model.cross_encoder:
                with stage("encode"):
                    base = out_dir / f"news_vectors-{model_sha[:16]}{'-bf16' if bf16 else ''}"
                    meta = {"model_sha256": model_sha, "data_key": dkey}
                    if bf16:
                        meta["bf16"] = True
                    table = NewsTable(prepared)
                    vec_path, enc = _encode_cached(pool, table, index["rows"], cfg, base, meta)
                    stats.update(enc)
                    pool.set_vectors(str(vec_path))
            with stage("score"):
                key = f"{model_sha}:{dkey}" + (":bf16" if bf16 else "")
                stats.update(_score_parts(pool, parts, out_dir, labeled, key, on_part))
            # workers that did no work in this call (all cached) report nothing
            stats["worker_peak_rss_mb"] = pool.peak_rss_mb()
    finally:
        pool.close()
    stats["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    # CPU seconds of this process and every worker during each stage (a stage's wall seconds
    # times the cores it kept busy); the index stage includes starting the workers
    stats["cpu_seconds"] = {k: round(v, 3) for k, v in cpu.items()}
    return SplitRun(parts, out_dir, index, labeled, info, stats)


def _load_index(pool: WorkerPool, n: int, split: str, base: Path) -> dict[str, np.ndarray]:
    path = base.with_name(f"{base.name}-v{PART_FORMAT}.npz")
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("ids", "sizes", "rows")}
    prog = Progress(f"index {split}", n, unit="shards")
    res: list[dict] = [{}] * n
    for i, r in pool.index_shards(range(n)):
        res[i] = r
        prog.update()
    prog.close()
    index = {
        "ids": np.concatenate([r["ids"] for r in res]) if n else np.zeros(0, "<U1"),
        "sizes": np.concatenate([r["sizes"] for r in res]) if n else np.zeros(0, np.int64),
        "rows": np.unique(np.concatenate([r["rows"] for r in res])) if n else np.zeros(0, np.int64),
    }
    atomic_save_npz(path, **index)
    return index


def _encode_cached(
    pool: WorkerPool, table: NewsTable, rows: np.ndarray, cfg: Any, base: Path, meta: dict
) -> tuple[Path, dict]:
    """Encode ``rows`` once (or reuse the cache) -> (vectors path, encode stats)."""
    vec_path = base.with_suffix(".npy")
    side = base.with_suffix(".json")
    if vec_path.is_file() and side.is_file():
        old = json.loads(side.read_text(encoding="utf-8"))
        if all(old.get(k) == v for k, v in meta.items()):
            return vec_path, {"news_needed": int(rows.size), "news_encoded": 0, "cache": "hit"}
    vectors, stats = encode_news_vectors(pool, table, rows, cfg.eval.encode_batch)
    atomic_save_npy(vec_path, vectors)
    stats["cache"] = "miss"
    atomic_write_json(side, {**meta, **stats})
    return vec_path, stats


def encode_news_vectors(
    pool: WorkerPool, table: NewsTable, rows: np.ndarray, encode_batch: int, progress: bool = True
) -> tuple[np.ndarray, dict]:
    """Encode ``rows`` once on the pool's workers -> (vectors ``[N, D]``, stats), docs/design.md
    §8.4: the run's evaluation and the trainer's in-memory one share this bookkeeping, so a
    row encoded twice or a needed one not at all is an error in both. Rows not needed stay
    zero; work units are :func:`~mtrec_dist.eval.engine.encode_chunks`."""
    chunks = encode_chunks(table, rows, encode_batch)
    prog = Progress("encode news", int(rows.size), unit="titles") if progress else None
    vectors: np.ndarray | None = None
    counts = np.zeros(len(table), dtype=np.int64)  # how often each row was encoded
    for _, (done, vecs) in pool.encode(chunks):
        if vectors is None:
            vectors = np.zeros((len(table), vecs.shape[1]), dtype=np.float32)
        vectors[done] = vecs
        np.add.at(counts, done, 1)
        if prog is not None:
            prog.update(int(done.size))
    if prog is not None:
        prog.close()
    if vectors is None:
        vectors = np.zeros((len(table), 1), dtype=np.float32)
    needed = np.zeros(len(table), dtype=bool)
    needed[rows] = True
    if (counts > 1).any() or not np.array_equal(counts > 0, needed):
        raise RuntimeError(
            f"news encoding bookkeeping failed: {int((counts > 1).sum())} rows encoded twice, "
            f"{int((needed & (counts == 0)).sum())} needed rows not encoded"
        )
    stats = {"news_needed": int(rows.size), "news_encoded": int(counts.sum())}
    stats["max_encodes_per_news"] = int(counts.max()) if counts.size else 0
    return vectors, stats


def _part_valid(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["key"]) == key
    except (OSError, ValueError, KeyError):
        return False


def _part_path(part_dir: Path, p: PartSpec) -> Path:
    return part_dir / f"part-{p.index:05d}.npz"


def _score_parts(
    pool: WorkerPool,
    parts: list[PartSpec],
    out_dir: Path,
    labeled: bool,
    key: str,
    on_part: OnPart | None,
) -> dict:
    part_dir = out_dir / "parts"
    part_dir.mkdir(parents=True, exist_ok=True)
    keys = [f"{PART_FORMAT}:{key}:{p.first}:{p.count}:{SCORE_BATCH}:{int(labeled)}" for p in parts]
    todo = [p for p, k in zip(parts, keys) if not _part_valid(_part_path(part_dir, p), k)]
    total = sum(p.count for p in parts)
    prog = Progress("score impressions", total, unit="impressions")
    prog.n = total - sum(p.count for p in todo)
    args = [(p, labeled, str(_part_path(part_dir, p)), keys[p.index]) for p in todo]
    written = 0
    for _, n_imp in pool.score_parts_to(args):
        written += 1
        prog.update(n_imp)
        if on_part is not None:
            on_part(written)
    prog.close()
    return {"parts": len(parts), "parts_scored": written, "parts_reused": len(parts) - written}


def iter_parts(r: SplitRun) -> Iterator[dict[str, np.ndarray]]:
    """Parts in order, checked against the index (ids and candidate counts)."""
    idx = r.index
    for p in r.parts:
        path = _part_path(r.out_dir / "parts", p)
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files if k != "key"}
        lo, hi = p.first, p.first + p.count
        if not (
            np.array_equal(d["ids"], idx["ids"][lo:hi])
            and np.array_equal(d["sizes"], idx["sizes"][lo:hi])
        ):
            raise RuntimeError(f"{path}: impressions differ from the split's index; delete it")
        yield d


def result(r: SplitRun, stats: dict) -> dict:
    """The record of one run's call: its own figures plus the run's (workers, cache, timings)."""
    out = dict(stats)
    out.update(r.stats)
    out["candidates_missing_news"] = _missing_news(r)
    return out


def _missing_news(r: SplitRun) -> int:
    return int(r.split_info.get("stats", {}).get("candidates_missing_news", 0))
