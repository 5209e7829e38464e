"""Sharded evaluation and prediction: encode every news once, score impressions part by part.

Pipeline for ``evaluate(run_dir, split)`` / ``predict(run_dir, split, out)`` (DESIGN.md §5):

1. **Index** the split (one pass over its shards, sharded over workers): impression ids,
   candidate counts and the set of news rows the split needs (history ∪ candidates). Cached in
   ``eval/<split>/index-<data key>.npz`` (it depends on the data only).
2. **Encode** those news once (bi-encoders): rows sorted by title length (little padding) and
   cut into fixed chunks of ``eval.encode_batch`` titles, dealt to the workers; the driver
   gathers them into one ``[N, D]`` float32 array cached as
   ``eval/<split>/news_vectors-<model sha256[:16]>.npy`` (+ a ``.json`` sidecar). A counter of
   the rows actually encoded (per row) is kept and reported: every needed row exactly once.
3. **Score** the impressions in fixed parts of ``eval.impressions_per_part`` (part k = the
   split's impressions ``[k P, (k+1) P)`` in behaviors order, whatever the number of workers),
   each part in batches of :data:`SCORE_BATCH` impressions of similar history length (sorted
   within the part) against the memory-mapped vectors
   (bounded memory per worker), written atomically to ``eval/<split>/parts/part-NNNNN.npz``.
   A part whose stored key (model, data, bounds) matches is skipped on a restart.
   Cross-encoders (``model.cross_encoder``, UNBERT) skip step 2 and score
   ``model(batch).scores`` on (history, candidate chunk) batches with the same parts.
4. **Merge** the parts in order: check ids/counts against the index, then average the
   per-impression metrics (:mod:`mtrec_dist.eval.metrics`) or write ``prediction.zip``
   (:mod:`mtrec_dist.eval.submission`).

Workers are Ray actors (``ray.init`` of a local instance when none is running, CPUs capped to
the workers asked for; fractional CPUs when a running cluster has fewer), or this process
when ``num_workers == 1``. Every worker computes with one torch thread and the work units
(chunks, parts, batches) do not depend on the number of workers, so the results are
byte-identical for any number of workers.

Failure injection for the restart test: ``MTREC_EVAL_FAIL_AFTER_PARTS=k`` makes the driver
raise after k parts were newly written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrec_dist.data.batch import NER_IGNORE, Batch, NewsTable, Sample, collate
from mtrec_dist.data.prepared import is_labeled, load_manifest, split_info, vocab_fingerprint
from mtrec_dist.data.stream import eval_impressions
from mtrec_dist.eval.metrics import METRICS, impression_metrics, summarize
from mtrec_dist.eval.submission import ranks_grouped, write_prediction
from mtrec_dist.utils import (
    Progress,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    sha256_file,
)

SCORE_BATCH = 512  # impressions per scoring forward pass (bi-encoder)
MEMORY_CHUNK = 50_000  # impressions held at once by evaluate_model (like one part)
CROSS_CHUNK = 32  # candidates per (history, candidates) sample for cross-encoders
CROSS_BATCH = 8  # such samples per cross-encoder forward pass
FAIL_ENV = "MTREC_EVAL_FAIL_AFTER_PARTS"
PART_FORMAT = "2"  # bump when the scoring order/batching changes: older parts are recomputed


class SimulatedCrash(RuntimeError):
    """Raised by the failure-injection hook (tests only)."""


# ============================================================================ small helpers


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _atomic_save_npy(path: Path, a: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, a, allow_pickle=False)


def data_key(manifest: dict, split: str) -> str:
    """Identity of the split's data: its shard hashes and the news table size."""
    info = manifest["splits"][split]
    text = json.dumps(
        {
            "news": manifest["news"]["count"],
            "shards": [(s["path"], s.get("sha256", ""), s["impressions"]) for s in info["shards"]],
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def news_batch(table: NewsTable, rows: np.ndarray) -> Batch:
    """A :class:`Batch` carrying only the per-news fields of ``rows`` (for ``encode_news``).

    Mirrors :func:`collate`'s per-news part (titles trimmed to the longest one, NER ignore ->
    -100); the sample side is one masked padding sample.
    """
    rows = np.array(rows, dtype=np.int64)  # a writable copy (Ray hands read-only arrays)
    U = rows.size
    tokens = np.asarray(table.tokens[rows], dtype=np.int64)  # [U, L_max]
    attn = tokens != 0
    L = max(int(attn.sum(1).max()), 1) if U else 1
    ner = np.asarray(table.ner[rows][:, :L], dtype=np.int64)
    ner[ner == NER_IGNORE] = -100
    t = torch.from_numpy
    z1 = torch.zeros(1, 1, dtype=torch.long)
    return Batch(
        news_rows=t(rows),
        tokens=t(np.ascontiguousarray(tokens[:, :L])),
        attention_mask=t(np.ascontiguousarray(attn[:, :L]).astype(np.int64)),
        ner=t(ner),
        category=t(np.asarray(table.category[rows], dtype=np.int64)),
        subcategory=t(np.asarray(table.subcategory[rows], dtype=np.int64)),
        sentiment=t(np.asarray(table.sentiment[rows], dtype=np.int64)),
        entities=t(np.asarray(table.entities[rows], dtype=np.int64)),
        hist_idx=z1,
        hist_mask=torch.zeros(1, 1, dtype=torch.bool),
        cand_idx=z1.clone(),
        cand_mask=torch.zeros(1, 1, dtype=torch.bool),
        labels=torch.zeros(1, 1),
        sample_mask=torch.zeros(1, dtype=torch.bool),
        hist_count=torch.zeros(U),
        impression_ids=("",),
        click_pos=torch.full((1,), -1, dtype=torch.long),
    )


def encode_chunks(table: NewsTable, rows: np.ndarray, encode_batch: int) -> list[np.ndarray]:
    """Deterministic encoding work units: rows sorted by title length, cut every
    ``encode_batch`` titles (titles of similar length share a forward pass: little padding)."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = (np.asarray(table.tokens[rows]) != 0).sum(1) if rows.size else np.zeros(0)
    order = np.lexsort((rows, lengths))
    rows = rows[order]
    return [rows[i : i + encode_batch] for i in range(0, rows.size, encode_batch)]


# ============================================================================ parts


@dataclass(frozen=True)
class PartSpec:
    """Impressions ``[first, first + count)`` of a split: shards to read and how many to skip."""

    index: int
    first: int
    count: int
    shards: tuple[int, ...]
    skip: int  # impressions to drop at the start of the first shard


def plan_parts(manifest: dict, split: str, per_part: int) -> list[PartSpec]:
    """Fixed parts of ``per_part`` impressions in behaviors order (independent of workers)."""
    counts = [int(s["impressions"]) for s in manifest["splits"][split]["shards"]]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(starts[-1])
    parts = []
    for k, first in enumerate(range(0, total, per_part)):
        end = min(first + per_part, total)
        sh = [i for i in range(len(counts)) if starts[i] < end and starts[i + 1] > first]
        parts.append(PartSpec(k, first, end - first, tuple(sh), first - int(starts[sh[0]])))
    return parts


def iter_part(prepared: Path, split: str, spec: PartSpec) -> Iterator[Sample]:
    samples = eval_impressions(prepared, split, shard_indices=list(spec.shards))
    return islice(samples, spec.skip, spec.skip + spec.count)


def _batched(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    while chunk := list(islice(it, n)):
        yield chunk


# ============================================================================ the engine


class Engine:
    """What one worker holds: the model, the news table and the cached news vectors.

    Used as is in this process, and wrapped as a Ray actor for several workers.
    """

    def __init__(self, model: torch.nn.Module, prepared: str | Path, split: str):
        self.model = model.eval()
        self.prepared = Path(prepared)
        self.split = split
        self.table = NewsTable(self.prepared)
        self.vectors: np.ndarray | None = None
        self.cross = bool(getattr(model, "cross_encoder", False))
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")

    # ---------------------------------------------------------------- step 1: index
    def index_shard(self, shard: int) -> dict[str, np.ndarray]:
        """Ids, candidate counts and the unique news rows (history ∪ candidates) of a shard."""
        return self.index_samples(
            eval_impressions(self.prepared, self.split, shard_indices=[shard])
        )

    @staticmethod
    def index_samples(samples: Iterator[Sample]) -> dict[str, np.ndarray]:
        ids, sizes, rows = [], [], []
        for s in samples:
            ids.append(s.impression_id)
            sizes.append(len(s.cand))
            rows.append(s.hist)
            rows.append(s.cand)
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return {
            "ids": np.asarray(ids, dtype=str),
            "sizes": np.asarray(sizes, dtype=np.int64),
            "rows": np.unique(flat).astype(np.int64),
        }

    # ---------------------------------------------------------------- step 2: encode
    @torch.no_grad()
    def encode(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows actually encoded, their vectors [n, D] float32)."""
        batch = news_batch(self.table, rows).to(self.device)
        vecs = self.model.encode_news(batch)  # [U, D]
        return batch.news_rows.cpu().numpy(), vecs.float().cpu().numpy()

    def set_vectors(self, path: str | Path | None, array: np.ndarray | None = None) -> None:
        self.vectors = array if array is not None else np.load(path, mmap_mode="r")

    @staticmethod
    def peak_rss_mb() -> float:
        """Peak resident memory of this worker process (MiB): the per-worker memory figure."""
        from mtrec_dist.utils import peak_rss_mb

        return round(peak_rss_mb(), 1)

    # ---------------------------------------------------------------- step 3: score
    @torch.no_grad()
    def score_samples(self, samples: list[Sample]) -> np.ndarray:
        """Flat float32 scores of the samples' candidates, in impression and candidate order."""
        if self.cross:
            return self._score_cross(samples)
        if self.vectors is None:
            raise RuntimeError("news vectors not set: encode the split first")
        batch = collate(samples, self.table)
        vecs = torch.from_numpy(np.ascontiguousarray(self.vectors[batch.news_rows.numpy()]))
        batch = batch.to(self.device)
        scores = self.model.score_news_vectors(vecs.to(self.device), batch)  # [B, C]
        return scores[batch.cand_mask].float().cpu().numpy()

    def _score_cross(self, samples: list[Sample]) -> np.ndarray:
        """Per-candidate path: (history, <= CROSS_CHUNK candidates) samples, CROSS_BATCH at a time."""
        pieces = [
            Sample(
                s.impression_id, s.hist, s.cand[j : j + CROSS_CHUNK], s.labels[j : j + CROSS_CHUNK]
            )
            for s in samples
            for j in range(0, len(s.cand), CROSS_CHUNK)
        ]
        out = []
        for group in _batched(iter(pieces), CROSS_BATCH):
            batch = collate(group, self.table).to(self.device)
            scores = self.model(batch).scores  # [b, c]
            out.append(scores[batch.cand_mask].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def score_many(self, samples: list[Sample]) -> np.ndarray:
        """Flat scores of many impressions, batched by similar history/candidate counts.

        Batches pad to their longest history and candidate list, so contiguous impressions
        (history 0..50) waste about half the user encoder's work; sorting by length first
        removes most of it. The order depends on the samples only, never on the workers.
        """
        if not samples:
            return np.zeros(0, dtype=np.float32)
        sizes = np.array([len(s.cand) for s in samples], dtype=np.int64)
        order = np.lexsort((sizes, np.array([len(s.hist) for s in samples])))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        out = np.empty(int(offsets[-1]), dtype=np.float32)
        for i in range(0, len(order), SCORE_BATCH):
            idx = order[i : i + SCORE_BATCH]
            flat = self.score_samples([samples[j] for j in idx])
            dst = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in idx])
            out[dst] = flat
        return out

    def score_part(self, spec: PartSpec, labeled: bool) -> dict[str, np.ndarray]:
        """Scores (and, when labeled, labels and per-impression metrics) of one part."""
        samples = list(iter_part(self.prepared, self.split, spec))
        out = {
            "ids": np.array([s.impression_id for s in samples], dtype=str),
            "sizes": np.array([len(s.cand) for s in samples], dtype=np.int64),
            "scores": self.score_many(samples),
        }
        if labeled:
            y = (
                np.concatenate([s.labels for s in samples]).astype(np.uint8)
                if samples
                else np.zeros(0, np.uint8)
            )
            out["labels"] = y
            out["metrics"] = impression_metrics(y, out["scores"], out["sizes"])
        return out

    def score_part_to(self, spec: PartSpec, labeled: bool, path: str, key: str) -> int:
        """Score a part and write it atomically to ``path``; returns its impression count."""
        out = self.score_part(spec, labeled)
        _atomic_save_npz(Path(path), key=np.array(key), **out)
        return int(out["ids"].size)


class _EngineActor(Engine):
    """Ray actor: builds the model from the run folder itself (one torch thread)."""

    def __init__(self, run_dir: str, split: str):
        torch.set_num_threads(1)
        model, cfg, _, _ = load_run(run_dir)
        super().__init__(model, cfg.prepared_dir, split)


# ============================================================================ workers


class _Pool:
    """Runs Engine methods on the workers; results come back in completion order.

    Workers start on the first call that has work (a finished run restarted starts none);
    ``broadcast`` calls made before that are replayed on the new workers.
    """

    def __init__(self, n: int, run_dir: Path, split: str, local_engine: Callable[[], Engine]):
        self.n, self.run_dir, self.split, self.local_engine = n, run_dir, split, local_engine
        self.local: Engine | None = None
        self.actors: list = []
        self.started = self.started_ray = False
        self.pending: list[tuple[str, tuple]] = []

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        if self.n == 1:
            self.local = self.local_engine()
        else:
            import ray

            if not ray.is_initialized():
                kw: dict[str, Any] = {"include_dashboard": False}
                if not os.environ.get("RAY_ADDRESS"):
                    kw["num_cpus"] = min(self.n, os.cpu_count() or 1)
                pkg_root = str(Path(__file__).resolve().parents[2])
                kw["runtime_env"] = {"env_vars": {"PYTHONPATH": pkg_root, "MTREC_QUIET": "1"}}
                ray.init(**kw)
                self.started_ray = True
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            Actor = ray.remote(num_cpus=min(1.0, cpus / self.n))(_EngineActor)
            self.actors = [Actor.remote(str(self.run_dir), self.split) for _ in range(self.n)]
        for method, args in self.pending:
            self.broadcast(method, *args)

    def map(self, method: str, arglists: list[tuple]) -> Iterator[tuple[int, Any]]:
        """Yield ``(i, result)`` of ``method(*arglists[i])`` as each finishes."""
        if not arglists:
            return
        self._start()
        if self.local is not None:
            fn = getattr(self.local, method)
            for i, args in enumerate(arglists):
                yield i, fn(*args)
            return
        import ray

        todo = list(enumerate(arglists))[::-1]
        running: dict[Any, tuple[int, Any]] = {}
        idle = list(self.actors)
        while todo or running:
            while todo and idle:
                i, args = todo.pop()
                actor = idle.pop()
                running[getattr(actor, method).remote(*args)] = (i, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(done[0])
            idle.append(actor)
            yield i, ray.get(done[0])

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every started worker; their results (none before a start)."""
        if not self.started:
            self.pending.append((method, args))
            return []
        if self.local is not None:
            return [getattr(self.local, method)(*args)]
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def close(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
            self.actors = []
            if self.started_ray:
                ray.shutdown()


# ============================================================================ run folder


def load_run(run_dir: str | Path) -> tuple[torch.nn.Module, Any, dict, str]:
    """(model with the exported weights, Config, manifest, sha256 of model.safetensors).

    Refuses a checkpoint whose tokenizer differs from the prepared data's (ConfigError).
    """
    from safetensors.torch import load_file

    from mtrec_dist.config import load_config
    from mtrec_dist.models.registry import build_model

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    weights = run_dir / "export" / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; is {run_dir} a run folder of `mtrec train`?")
    cfg = load_config(cfg_path)
    manifest = load_manifest(cfg.prepared_dir)
    check_run_tokenizer(run_dir, cfg, manifest)
    check_run_vocab(run_dir, cfg)
    model = build_model(cfg, manifest)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), cfg, manifest, sha256_file(weights)


def check_run_tokenizer(run_dir: Path, cfg: Any, manifest: dict) -> None:
    """The checkpoint's tokenizer (export/meta.json, else the encoder's) must be the data's."""
    from mtrec_dist.config import ConfigError

    meta_path = run_dir / "export" / "meta.json"
    fp = None
    if meta_path.is_file():
        tok = json.loads(meta_path.read_text(encoding="utf-8")).get("tokenizer")
        fp = tok if isinstance(tok, dict) and "vocab_hash" in tok else None
        if isinstance(tok, str):
            fp = {"vocab_hash": tok}
    if fp is None:
        from mtrec_dist.hub import load_tokenizer, tokenizer_fingerprint

        fp = tokenizer_fingerprint(load_tokenizer(cfg.model.encoder))
    want = manifest["tokenizer"]
    if fp["vocab_hash"] != want.get("vocab_hash"):
        raise ConfigError(
            f"{meta_path}: the checkpoint's tokenizer ({fp.get('name', '?')}, vocab_hash "
            f"{fp['vocab_hash'][:16]}...) does not match the prepared data "
            f"{cfg.prepared_dir}/manifest.json ({want.get('name', '?')}, encoder "
            f"{want.get('encoder', '?')}, vocab_hash {str(want.get('vocab_hash'))[:16]}...): "
            "evaluate on data prepared with the model's encoder (data.prepared) or re-run "
            "`mtrec prepare` with model.encoder set to it"
        )


def check_run_vocab(run_dir: Path, cfg: Any) -> None:
    """The checkpoint's category/subcategory/entity vocabularies must be the data's: a model
    trained on another news table reads category and entity ids as other classes."""
    from mtrec_dist.config import ConfigError

    meta_path = run_dir / "export" / "meta.json"
    if not meta_path.is_file():
        return
    have = json.loads(meta_path.read_text(encoding="utf-8")).get("vocab_sha256")
    want = vocab_fingerprint(cfg.prepared_dir)
    if have is not None and have != want:
        raise ConfigError(
            f"{meta_path}: the checkpoint was trained on a news table with other vocabularies "
            f"(vocab_sha256 {have[:16]}...) than {cfg.prepared_dir}/vocab ({want[:16]}...): "
            "evaluate on the prepared folder the run was trained on (data.prepared in "
            f"{run_dir}/config.yaml)"
        )


# ============================================================================ driver


def _fail_after() -> int | None:
    v = os.environ.get(FAIL_ENV, "")
    return int(v) if v else None


def _part_valid(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["key"]) == key
    except (OSError, ValueError, KeyError):
        return False


def _load_index(pool: _Pool, manifest: dict, split: str, path: Path) -> dict[str, np.ndarray]:
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("ids", "sizes", "rows")}
    n = len(manifest["splits"][split]["shards"])
    prog = Progress(f"index {split}", n, unit="shards")
    res: list[dict | None] = [None] * n
    for i, r in pool.map("index_shard", [(k,) for k in range(n)]):
        res[i] = r
        prog.update()
    prog.close()
    index = {
        "ids": np.concatenate([r["ids"] for r in res]) if n else np.zeros(0, np.int64),
        "sizes": np.concatenate([r["sizes"] for r in res]) if n else np.zeros(0, np.int64),
        "rows": np.unique(np.concatenate([r["rows"] for r in res])) if n else np.zeros(0, np.int64),
    }
    _atomic_save_npz(path, **index)
    return index


def _encode_all(
    pool: _Pool, table: NewsTable, rows: np.ndarray, encode_batch: int, base: Path, meta: dict
) -> tuple[Path, dict]:
    """Encode ``rows`` once (or reuse the cache) -> (vectors path, encode stats)."""
    vec_path = base.with_suffix(".npy")
    side = base.with_suffix(".json")
    if vec_path.is_file() and side.is_file():
        old = json.loads(side.read_text(encoding="utf-8"))
        if all(old.get(k) == v for k, v in meta.items()):
            return vec_path, {"news_needed": int(rows.size), "news_encoded": 0, "cache": "hit"}
    chunks = encode_chunks(table, rows, encode_batch)
    prog = Progress("encode news", int(rows.size), unit="titles")
    vectors: np.ndarray | None = None
    counts = np.zeros(len(table), dtype=np.int64)  # how often each row was encoded
    for _, (done, vecs) in pool.map("encode", [(c,) for c in chunks]):
        if vectors is None:
            vectors = np.zeros((len(table), vecs.shape[1]), dtype=np.float32)
        vectors[done] = vecs
        np.add.at(counts, done, 1)
        prog.update(int(done.size))
    prog.close()
    if vectors is None:
        vectors = np.zeros((len(table), 1), dtype=np.float32)
    encoded = counts > 0
    needed = np.zeros(len(table), dtype=bool)
    needed[rows] = True
    if (counts > 1).any() or not np.array_equal(encoded, needed):
        raise RuntimeError(
            f"news encoding bookkeeping failed: {int((counts > 1).sum())} rows encoded twice, "
            f"{int((needed & ~encoded).sum())} needed rows not encoded"
        )
    _atomic_save_npy(vec_path, vectors)
    stats = {"news_needed": int(rows.size), "news_encoded": int(counts.sum()), "cache": "miss"}
    stats["max_encodes_per_news"] = int(counts.max()) if counts.size else 0
    atomic_write_json(side, {**meta, **stats})
    return vec_path, stats


def _run(run_dir: str | Path, split: str, num_workers: int | None, need_labels: bool) -> dict:
    """Steps 1-3; returns everything the merge needs."""
    run_dir = Path(run_dir)
    model, cfg, manifest, model_sha = load_run(run_dir)
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
    n = max(1, int(num_workers or cfg.eval.num_workers))
    n = min(n, max(len(parts), len(info["shards"]), 1))
    cross = bool(getattr(model, "cross_encoder", False))

    def local() -> Engine:
        return Engine(model, prepared, split)

    pool = _Pool(n, run_dir, split, local)
    stats: dict[str, Any] = {"workers": n, "model_sha256": model_sha}
    seconds: dict[str, float] = {}
    threads = _torch_threads(1) if n == 1 else contextlib.nullcontext()
    try:
        with threads:
            t0 = time.perf_counter()
            index = _load_index(pool, manifest, split, out_dir / f"index-{dkey[:16]}.npz")
            seconds["index"] = time.perf_counter() - t0
            if not cross:
                t0 = time.perf_counter()
                base = out_dir / f"news_vectors-{model_sha[:16]}"
                meta = {"model_sha256": model_sha, "data_key": dkey}
                table = NewsTable(prepared)
                vec_path, enc = _encode_all(
                    pool, table, index["rows"], cfg.eval.encode_batch, base, meta
                )
                stats.update(enc)
                pool.broadcast("set_vectors", str(vec_path))
                seconds["encode"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            stats.update(_score_parts(pool, parts, out_dir, labeled, f"{model_sha}:{dkey}"))
            seconds["score"] = time.perf_counter() - t0
            # workers that did no work in this call (all cached) report nothing
            stats["worker_peak_rss_mb"] = pool.broadcast("peak_rss_mb") if pool.started else []
    finally:
        pool.close()
    stats["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return {
        "parts": parts,
        "out_dir": out_dir,
        "index": index,
        "labeled": labeled,
        "stats": stats,
        "split_info": info,
    }


def _score_parts(
    pool: _Pool, parts: list[PartSpec], out_dir: Path, labeled: bool, key: str
) -> dict:
    part_dir = out_dir / "parts"
    part_dir.mkdir(parents=True, exist_ok=True)
    keys = [f"{PART_FORMAT}:{key}:{p.first}:{p.count}:{SCORE_BATCH}:{int(labeled)}" for p in parts]
    todo = [p for p, k in zip(parts, keys) if not _part_valid(_part_path(part_dir, p), k)]
    total = sum(p.count for p in parts)
    prog = Progress("score impressions", total, unit="impressions")
    prog.n = total - sum(p.count for p in todo)
    fail_after = _fail_after()
    args = [(p, labeled, str(_part_path(part_dir, p)), keys[p.index]) for p in todo]
    written = 0
    for _, n_imp in pool.map("score_part_to", args):
        written += 1
        prog.update(n_imp)
        if fail_after is not None and written >= fail_after:
            raise SimulatedCrash(f"{FAIL_ENV}={fail_after}: stopping after {written} parts")
    prog.close()
    return {"parts": len(parts), "parts_scored": written, "parts_reused": len(parts) - written}


def _part_path(part_dir: Path, p: PartSpec) -> Path:
    return part_dir / f"part-{p.index:05d}.npz"


def _iter_parts(r: dict) -> Iterator[dict[str, np.ndarray]]:
    """Parts in order, checked against the index (ids and candidate counts)."""
    idx = r["index"]
    for p in r["parts"]:
        path = _part_path(r["out_dir"] / "parts", p)
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files if k != "key"}
        lo, hi = p.first, p.first + p.count
        if not (
            np.array_equal(d["ids"], idx["ids"][lo:hi])
            and np.array_equal(d["sizes"], idx["sizes"][lo:hi])
        ):
            raise RuntimeError(f"{path}: impressions differ from the split's index; delete it")
        yield d


def _result(r: dict, stats: dict) -> dict:
    out = dict(stats)
    out.update(r["stats"])
    out["candidates_missing_news"] = int(
        r["split_info"].get("stats", {}).get("candidates_missing_news", 0)
    )
    return out


def evaluate(run_dir: str | Path, split: str = "dev", num_workers: int | None = None) -> dict:
    """AUC/MRR/nDCG@5/nDCG@10 of the run's exported model on a labeled split.

    Also writes ``eval/<split>/metrics.json``. Counts: ``impressions``, ``auc_skipped``
    (single-class impressions), ``no_click_skipped``, ``candidates_missing_news`` (candidates
    not in news.tsv, scored as the empty title), ``news_encoded`` (0 on a cache hit).
    """
    r = _run(run_dir, split, num_workers, need_labels=True)
    per = np.concatenate([d["metrics"] for d in _iter_parts(r)]) if r["parts"] else np.zeros((0, 4))
    res = _result(r, summarize(per))
    res["split"] = split
    atomic_write_json(r["out_dir"] / "metrics.json", res)
    _say(f"{split}: " + ", ".join(f"{m} {res[m]:.4f}" for m in METRICS))
    return res


def predict(
    run_dir: str | Path,
    split: str = "test",
    out: str | Path = "prediction.zip",
    num_workers: int | None = None,
) -> Path:
    """Write ``prediction.zip`` (``prediction.txt``: ``ImpressionID [r1,r2,...]`` per line)."""
    r = _run(run_dir, split, num_workers, need_labels=False)
    idx = r["index"]

    def lines() -> Iterator[tuple[str, list[int]]]:
        for d in _iter_parts(r):
            ranks = ranks_grouped(d["scores"], d["sizes"]).tolist()
            ends = np.cumsum(d["sizes"]).tolist()
            start = 0
            for imp, end in zip(d["ids"].tolist(), ends):
                yield str(imp), ranks[start:end]
                start = end

    t0 = time.perf_counter()
    path = write_prediction(
        lines(), out, [str(i) for i in idx["ids"].tolist()], idx["sizes"].tolist()
    )
    stats = _result(r, {"split": split, "impressions": int(idx["ids"].size), "out": str(path)})
    stats["seconds"]["merge"] = round(time.perf_counter() - t0, 3)
    # a record of how the file was made (model, data, timings, per-worker memory)
    atomic_write_json(r["out_dir"] / "prediction.json", stats)
    _say(f"wrote {path} ({idx['ids'].size} impressions)")
    return path


def _say(msg: str) -> None:
    if os.environ.get("MTREC_QUIET", "") == "":
        print(msg, file=sys.stderr, flush=True)


# ============================================================================ in-trainer path


def evaluate_model(
    model: torch.nn.Module,
    prepared_dir: str | Path,
    split: str = "dev",
    max_impressions: int = 0,
    encode_batch: int = 256,
) -> dict:
    """Dev metrics of an in-memory model in this process (the trainer's periodic evaluation).

    Same steps as :func:`evaluate` without files or workers: the first ``max_impressions``
    impressions (0 = all), their news encoded once, scored in batches of SCORE_BATCH.
    """
    prepared = Path(prepared_dir)
    manifest = load_manifest(prepared)
    info = split_info(manifest, split, prepared)
    if not is_labeled(manifest, split, prepared):
        raise ValueError(f"{prepared}/manifest.json: split {split!r} has no labels")
    limit = max_impressions if max_impressions > 0 else None

    def samples() -> Iterator[Sample]:
        return islice(eval_impressions(prepared, split), limit)

    was_training = model.training
    eng = Engine(model, prepared, split)
    try:
        stats: dict[str, Any] = {}
        if not eng.cross:
            rows = Engine.index_samples(samples())["rows"]
            vectors = None
            for chunk in encode_chunks(eng.table, rows, encode_batch):
                done, vecs = eng.encode(chunk)
                if vectors is None:
                    vectors = np.zeros((len(eng.table), vecs.shape[1]), dtype=np.float32)
                vectors[done] = vecs
            eng.set_vectors(
                None, vectors if vectors is not None else np.zeros((len(eng.table), 1), np.float32)
            )
            stats["news_encoded"] = int(rows.size)
        per = []
        for chunk in _batched(samples(), MEMORY_CHUNK):
            scores = eng.score_many(chunk)
            labels = np.concatenate([s.labels for s in chunk])
            per.append(impression_metrics(labels, scores, np.array([len(s.cand) for s in chunk])))
    finally:
        model.train(was_training)
    res = summarize(np.concatenate(per) if per else np.zeros((0, 4)))
    res.update(stats)
    res["candidates_missing_news"] = int(info.get("stats", {}).get("candidates_missing_news", 0))
    return res
