"""The scoring engine: what one evaluation worker does, independent of files, pools and drivers.

A worker holds the model, the news table and (bi-encoders) the split's news vectors, and does
three kinds of work unit, each a pure function of its input (so the results do not depend on
how many workers share the split, or which one does which unit):

1. **index** a shard: impression ids, candidate counts, the news rows it needs;
2. **encode** a chunk of news rows (titles of similar length, :func:`encode_chunks`) into
   vectors; the driver's ``encode_news_vectors`` gathers every chunk into one ``[N, D]`` array and checks
   that every needed row was encoded exactly once — the one encoding routine of the sharded
   driver and of the trainer's in-memory evaluation;
3. **score** impressions against the vectors: through the model's own fast scorer when it has
   one (``model.fast_scorer``, docs/design.md §3: MTRec's factored attention in
   :mod:`mtrec_dist.models.factored`, per-news attention logits, sparse user vectors, sampled
   dot products; no batches), every other bi-encoder through ``model.score_news_vectors`` in
   batches of similar history length, or, for cross-encoders (``model.cross_encoder``, UNBERT),
   by ``model(batch).scores`` on (history, candidate chunk) samples. A *part* is a fixed range
   of the split's impressions (:func:`plan_parts`), read shard group by shard group into flat
   arrays (:func:`read_part`, :class:`~mtrec_dist.data.impressions.Impressions`, the one
   impression type of the data layer, docs/design.md §2): the fast scorer takes them as they
   are, the batched paths gather batches of them for ``collate``; no object per impression. A
   labeled part also carries the per-impression metrics of the ranks a submission would carry
   (:func:`ranked_impression_metrics`).

Impression ids travel as the exact strings the data stream gives (``003`` stays ``003``).

The engine computes where its model's parameters are (docs/design.md §8.5): on a GPU the news
chunks are encoded there (under bf16 autocast when asked, :func:`encode_autocast`), the news
vectors are held there and every score is computed there; results come back to the CPU as
numpy arrays once per chunk, part or scoring chunk. On the CPU every step is the one it always
was.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtrec_dist.data.batch import Batch, NewsTable, collate, news_fields
from mtrec_dist.data.impressions import Impressions, Sample, as_impressions
from mtrec_dist.data.stream import eval_groups, take
from mtrec_dist.metrics import ranked_impression_metrics
from mtrec_dist.models import layer_cache
from mtrec_dist.models.base import FastScorer, NewsRecModel
from mtrec_dist.utils import atomic_open, atomic_write_bytes, offsets_of, peak_rss_mb

SCORE_BATCH = 512  # impressions per scoring forward pass (bi-encoder)
CROSS_CHUNK = 32  # candidates per (history, candidates) sample for cross-encoders
CROSS_BATCH = 8  # such samples per cross-encoder forward pass
PART_FORMAT = "4"  # bump when a part's contents change (3: string ids, ranked metrics; 4: factored MTRec scores)


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npy(path: Path, a: np.ndarray) -> None:
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
    """A :class:`Batch` carrying only the per-news fields of ``rows`` (for ``encode_news``):
    :func:`~mtrec_dist.data.batch.news_fields`, and one masked padding sample."""
    z1 = torch.zeros(1, 1, dtype=torch.long)
    return Batch(
        **news_fields(table, np.asarray(rows, dtype=np.int64)),
        hist_idx=z1,
        hist_mask=torch.zeros(1, 1, dtype=torch.bool),
        cand_idx=z1.clone(),
        cand_mask=torch.zeros(1, 1, dtype=torch.bool),
        labels=torch.zeros(1, 1),
        sample_mask=torch.zeros(1, dtype=torch.bool),
        hist_count=torch.zeros(len(rows)),
        impression_ids=("",),
        click_pos=torch.full((1,), -1, dtype=torch.long),
    )


def encode_autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """The context the news encoder runs in: bf16 autocast on ``device`` when ``eval.bf16``
    (faster on a GPU; ranks may move where two scores are within bf16 rounding), else
    nothing, so the default path is the exact fp32 one."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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


def read_part(prepared: Path, split: str, spec: PartSpec) -> Impressions:
    """The part's impressions as flat arrays, read group by group (no object per impression)."""
    groups = eval_groups(prepared, split, shard_indices=list(spec.shards))
    return Impressions.concat(list(take(groups, spec.skip, spec.count)))


def index_impressions(imps: Impressions | Iterable[Sample]) -> dict[str, np.ndarray]:
    """Ids, candidate counts and the unique news rows (history ∪ candidates) of impressions."""
    imps = as_impressions(imps)
    return {
        "ids": imps.ids,
        "sizes": imps.sizes,
        "rows": np.unique(np.concatenate([imps.hist, imps.cand])).astype(np.int64),
    }


def labeled_part(imps: Impressions | Iterable[Sample], scores: np.ndarray) -> dict[str, np.ndarray]:
    """Ids, sizes, scores, labels and the per-impression metrics (tie rule) of scored
    impressions."""
    imps = as_impressions(imps)
    y = imps.labels.astype(np.uint8)
    return {
        "ids": imps.ids,
        "sizes": imps.sizes,
        "scores": scores,
        "labels": y,
        "metrics": ranked_impression_metrics(y, scores, imps.sizes),
    }


# ============================================================================ the engine


class Engine:
    """What one worker holds: the model, the news table and the cached news vectors.

    Used as is in this process, and wrapped as a Ray actor for several workers
    (:mod:`mtrec_dist.eval.pool`).
    """

    def __init__(
        self, model: torch.nn.Module, prepared: str | Path, split: str, bf16: bool = False
    ):
        """``model`` already on its device (the engine computes where its parameters are);
        ``bf16``: encode news under bf16 autocast (``eval.bf16``)."""
        self.model = model.eval()
        self.bf16 = bf16
        self.prepared = Path(prepared)
        self.split = split
        self.table = NewsTable(self.prepared)
        self.vectors: np.ndarray | None = None
        self.factored: FastScorer | None = None  # built on first use after set_vectors
        self.factored_checked = False
        self.cross: bool = model.cross_encoder  # the stand-ins of the tests declare it too
        layer_cache.attach(
            model, self.prepared, build=False
        )  # a complete cache saves the frozen layers
        try:
            first = next(model.parameters())
            self.device, self.dtype = first.device, first.dtype
        except StopIteration:
            self.device, self.dtype = torch.device("cpu"), torch.float32
        # off the CPU the vectors are copied to the device once and gathered there per batch
        # (a flag, so the CPU tests can take that path too)
        self.gather_on_device = self.device.type != "cpu"
        self.vectors_on_device: torch.Tensor | None = None  # device copy of ``vectors``

    def index_shard(self, shard: int) -> dict[str, np.ndarray]:
        """Ids, candidate counts and the unique news rows (history ∪ candidates) of a shard."""
        groups = eval_groups(self.prepared, self.split, shard_indices=[shard])
        return index_impressions(Impressions.concat(list(groups)))

    @torch.no_grad()
    def encode(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows actually encoded, their vectors [n, D] float32)."""
        batch = news_batch(self.table, rows).to(self.device)
        with encode_autocast(self.device, self.bf16):
            vecs = self.model.encode_news(batch)  # [U, D]
        return batch.news_rows.cpu().numpy(), vecs.float().cpu().numpy()

    def set_vectors(self, path: str | Path | None, array: np.ndarray | None = None) -> None:
        self.vectors = array if array is not None else np.load(path, mmap_mode="r")
        self.factored, self.factored_checked = None, False
        self.vectors_on_device = None  # copied again on first use (_device_vectors)

    def factored_scorer(self) -> FastScorer | None:
        """The model's own fast scorer (``model.fast_scorer``: MTRec's factored attention),
        built once per set of vectors; None for a model without one and for a plain module
        outside the model contract (the tests' stand-ins), which take the batched path."""
        if not self.factored_checked and self.vectors is not None and not self.cross:
            if isinstance(self.model, NewsRecModel):
                self.factored = self.model.fast_scorer(self.vectors)
            self.factored_checked = True
        return self.factored

    @staticmethod
    def peak_rss_mb() -> float:
        """Peak resident memory of this worker process (MiB): the per-worker memory figure."""
        return round(peak_rss_mb(), 1)

    @staticmethod
    def cpu_seconds() -> float:
        """CPU seconds this worker process has used so far (user + system, every thread)."""
        return time.process_time()

    @torch.no_grad()
    def score_batch(self, imps: Impressions) -> np.ndarray:
        """Flat float32 scores of one batch of impressions, in impression and candidate order."""
        return self._score_batch(imps).cpu().numpy()

    @torch.no_grad()
    def _score_batch(self, imps: Impressions) -> torch.Tensor:
        """:meth:`score_batch` left on the model's device (float32; a cross-encoder's on the
        CPU, its pieces coming back one forward pass at a time)."""
        if self.cross:
            return torch.from_numpy(self._score_cross(imps))
        if self.vectors is None:
            raise RuntimeError("news vectors not set: encode the split first")
        batch = collate(imps, self.table)
        if self.gather_on_device:
            vecs = self._device_vectors()[batch.news_rows.to(self.device)]
        else:
            vecs = torch.from_numpy(np.ascontiguousarray(self.vectors[batch.news_rows.numpy()]))
        batch = batch.to(self.device)
        vecs = vecs.to(self.device, self.dtype)  # a bf16-trained model scores in its dtype
        scores = self.model.score_news_vectors(vecs, batch)  # [B, C]
        return scores[batch.cand_mask].float()

    def _device_vectors(self) -> torch.Tensor:
        """``vectors`` copied once to the device (set_vectors drops the copy)."""
        if self.vectors_on_device is None:
            v = np.ascontiguousarray(self.vectors, dtype=np.float32)
            self.vectors_on_device = torch.from_numpy(v).to(self.device)
        return self.vectors_on_device

    def _score_cross(self, imps: Impressions) -> np.ndarray:
        """Per-candidate path: (history, <= CROSS_CHUNK candidates) samples, CROSS_BATCH at a
        time. A piece is its impression with a run of its candidates: ``cand`` and ``labels``
        stay the same flat arrays, only ``sizes`` is cut."""
        pieces_of = -(-imps.sizes // CROSS_CHUNK)  # [n] ceil(size / CROSS_CHUNK)
        owner = np.repeat(np.arange(len(imps)), pieces_of)
        within = np.arange(owner.size) - np.repeat(offsets_of(pieces_of)[:-1], pieces_of)
        rows = imps.gather(owner)  # ids, history and user (NPA's attention reads it) per piece
        pieces = Impressions(
            rows.ids, rows.hist, rows.hist_len, imps.cand,
            np.minimum(imps.sizes[owner] - within * CROSS_CHUNK, CROSS_CHUNK), imps.labels,
            rows.user, np.full(owner.size, -1, dtype=np.int64),
        )  # fmt: skip
        out = []
        for lo in range(0, len(pieces), CROSS_BATCH):
            batch = collate(pieces.slice(lo, lo + CROSS_BATCH), self.table).to(self.device)
            scores = self.model(batch).scores  # [b, c]
            out.append(scores[batch.cand_mask].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def score_many(self, imps: Impressions | list[Sample]) -> np.ndarray:
        """Flat scores of many impressions, in impression and candidate order.

        A model with a fast scorer (MTRec's factored one) scores the flat arrays (no batches: every
        impression is scored on its own by sparse products). Other models: batches of similar
        history and candidate counts (gathered from the columns) through
        ``model.score_news_vectors`` / ``model(batch)`` (batches pad to their longest history
        and candidate list, so contiguous impressions, history 0..50, would waste about half
        the user encoder's work). Either way the order depends on the impressions only, never
        on the workers.
        """
        imps = as_impressions(imps)
        if not len(imps):
            return np.zeros(0, dtype=np.float32)
        fast = self.factored_scorer()
        if fast is not None:
            return fast.scores(imps.hist, imps.hist_len, imps.cand, imps.sizes)
        sizes = imps.sizes
        order = np.lexsort((sizes, imps.hist_len))
        offsets = offsets_of(sizes)
        out = np.empty(int(offsets[-1]), dtype=np.float32)
        slots, scored = [], []  # kept on the device until every batch is scored
        for i in range(0, len(order), SCORE_BATCH):
            idx = order[i : i + SCORE_BATCH]
            scored.append(self._score_batch(imps.gather(idx)))
            n = sizes[idx]  # the batch's candidates go back to their impressions' slots
            slots.append(np.repeat(offsets[idx] - np.cumsum(n) + n, n) + np.arange(int(n.sum())))
        out[np.concatenate(slots)] = torch.cat(scored).cpu().numpy()
        return out

    def score_part(self, spec: PartSpec, labeled: bool) -> dict[str, np.ndarray]:
        """Scores (and, when labeled, labels and per-impression metrics) of one part."""
        imps = read_part(self.prepared, self.split, spec)
        scores = self.score_many(imps)
        if labeled:
            return labeled_part(imps, scores)
        return {"ids": imps.ids, "sizes": imps.sizes, "scores": scores}

    def score_part_to(self, spec: PartSpec, labeled: bool, path: str, key: str) -> int:
        """Score a part and write it atomically to ``path``; returns its impression count."""
        out = self.score_part(spec, labeled)
        atomic_save_npz(Path(path), key=np.array(key), **out)
        return int(out["ids"].size)
