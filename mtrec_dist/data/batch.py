"""The news table on disk and the de-duplicated batch the models consume.

Data contracts: docs/design.md §2 Data contracts (§2.1 news table, §2.5 de-duplicated batch).

A batch encodes each distinct title once: ``news_rows[U]`` are the unique news-table rows,
and samples point at them by index (``hist_idx``, ``cand_idx``). Autograd sums the gradient
of every occurrence, so this is exact. Per-news auxiliary losses use ``hist_count`` (how often
each unique news occurs among real history slots) so they equal the non-de-duplicated loss.

Layout of a prepared folder (written by ``mtrec_dist.data.prepare``)::

    manifest.json
    news/tokens.npy      int32 [N, L]  word pieces; row = [CLS] ... [SEP] then 0 (pad)
    news/ner.npy         uint8 [N, L]  0=O 1=B 2=I, NER_IGNORE at special tokens and padding
    news/category.npy    int16 [N]     0 = unknown
    news/subcategory.npy int16 [N]     0 = unknown
    news/sentiment.npy   int8  [N]     -1 = none
    news/entities.npy    int32 [N, E]  0 = none (entity vocabulary index)
    news/news_ids.txt    line i = news id of row i; row 0 is "<pad>": the empty title
    vocab/category.json  vocab/subcategory.json  vocab/entities.json
    vocab/users.json     "<unk>" then the train split's user ids, sorted (index = user index)
    shards/<split>-000000.tar ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from mtrec_dist.data.impressions import Impressions, Sample, as_impressions
from mtrec_dist.tasks import CATEGORY, NER, NEWS_TASKS, SENTIMENT
from mtrec_dist.utils import offsets_of

NER_TAGS = ("O", "B", "I")
NER_IGNORE = 255  # in ner.npy: special tokens and padding; becomes -100 in a batch
PAD_NEWS_ID = "<pad>"


class NewsTable:
    """Memory-mapped news table; every worker opens its own view (no copy per process)."""

    def __init__(self, prepared: str | Path):
        d = Path(prepared) / "news"
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no news table; run `mtrec prepare` first")
        self.dir = d
        self.tokens = np.load(d / "tokens.npy", mmap_mode="r")
        self.ner = np.load(d / "ner.npy", mmap_mode="r")
        self.category = np.load(d / "category.npy", mmap_mode="r")
        self.subcategory = np.load(d / "subcategory.npy", mmap_mode="r")
        self.sentiment = np.load(d / "sentiment.npy", mmap_mode="r")
        self.entities = np.load(d / "entities.npy", mmap_mode="r")
        self._ids: list[str] | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def news_ids(self) -> list[str]:
        if self._ids is None:
            self._ids = (
                (self.dir / "news_ids.txt").read_text(encoding="utf-8").split("\n")[: len(self)]
            )
        return self._ids

    def row_of(self) -> dict[str, int]:
        return {nid: i for i, nid in enumerate(self.news_ids)}


@dataclass
class Batch:
    """What a model reads, with one meaning per field in both de-duplication modes
    (docs/design.md §2.5, §2.6; the modes are ``mtrec_dist.models.dedup``'s):

    - per-news fields (``news_rows`` .. ``entities``, ``hist_count``; U rows): the titles THIS
      rank encodes: every distinct title of its micro-batch (``collate``), or its share of the
      global batch's titles (``data.dedup=global``);
    - ``hist_idx`` / ``cand_idx``: indices into the news vectors as ``dedup.news_vectors``
      returns them (the U rows themselves, or the global batch's U_g unique rows);
    - per-sample fields ([B] or [B, ...]): this rank's samples.
    """

    news_rows: torch.Tensor  # [U] long, news-table rows of the titles this rank encodes
    tokens: torch.Tensor  # [U, L] long, trimmed to the longest title in the batch
    attention_mask: torch.Tensor  # [U, L] long
    ner: torch.Tensor  # [U, L] long, 0/1/2, -100 = ignore
    category: torch.Tensor  # [U] long, 0 = unknown
    subcategory: torch.Tensor  # [U] long
    sentiment: torch.Tensor  # [U] long, -1 = none
    entities: torch.Tensor  # [U, E] long, 0 = none
    hist_idx: torch.Tensor  # [B, H] long into dedup.news_vectors' rows (0 where masked)
    hist_mask: torch.Tensor  # [B, H] bool, real history slots
    cand_idx: torch.Tensor  # [B, C] long into dedup.news_vectors' rows
    cand_mask: torch.Tensor  # [B, C] bool
    labels: torch.Tensor  # [B, C] float
    sample_mask: torch.Tensor  # [B] bool, False for padding samples that fill the last batch
    # [U] float, occurrences among real history slots of real samples (of every rank's samples
    # on a global share; the loss weights there are ``aux_weight``)
    hist_count: torch.Tensor
    impression_ids: tuple[str, ...]  # [B] source ids; "" for padding samples (not a tensor)
    click_pos: torch.Tensor  # [B] long
    # [B] long user index (LSTUR / NPA user-ID embeddings), 0 = unknown user; empty ([0]) when
    # the batch was built without users (then every sample is the unknown user).
    user_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # The number of rows dedup.news_vectors returns for a rank's share of the global batch
    # (``dedup.exchange_batch``: U = S owned titles, pads included, of U_g); 0 = a per-rank
    # batch, whose hist_idx / cand_idx index its own U titles.
    global_unique: int = 0
    # [U, len(NEWS_TASKS)] float64 on a global share: the owner's per-news loss weights, every
    # rank's normaliser included (``dedup.owner_weights``); empty ([0]) on a per-rank batch.
    aux_weight: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The tensors moved to ``device`` (the impression ids are strings and stay).

        ``non_blocking``: from page-locked memory (:meth:`pin_memory`) the host-to-GPU copies
        are queued on the stream and the host goes on (docs/design.md §5, the GPU step); from
        pageable memory, or to the CPU, they are ordinary copies."""
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Every tensor in page-locked host memory (needs a CUDA build; see
        ``data.stream.pin_batches`` for when the loader asks for it)."""
        return self._map(lambda v: v.pin_memory())

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(
            **{
                f.name: fn(v) if isinstance(v, torch.Tensor) else v
                for f in fields(self)
                for v in (getattr(self, f.name),)
            }
        )

    @property
    def num_titles(self) -> int:
        """Titles this rank's encoder runs on (a global batch's share includes its pad rows)."""
        return int(self.news_rows.numel())

    def news_valid(self) -> torch.Tensor:
        """[U, len(NEWS_TASKS)] bool: the news has a label for the task (category > 0, at least
        one tagged token, a sentiment >= 0), as the task losses in ``models/heads.py`` read
        them; the cross-rank normalisers (``dedup.exchange_batch``) count with it."""
        has = {
            CATEGORY: self.category > 0,
            NER: (self.ner != -100).any(1),
            SENTIMENT: self.sentiment >= 0,
        }  # [U] each
        return torch.stack([has[task] for task in NEWS_TASKS], dim=1)


def news_fields(table: NewsTable, news_rows: np.ndarray) -> dict[str, torch.Tensor]:
    """The per-news fields of a :class:`Batch` for ``news_rows`` [U], tokens trimmed to the
    longest title among them; shared by ``collate`` and the cross-rank global batch."""
    tokens = np.asarray(table.tokens[news_rows], dtype=np.int64)  # [U, L_max]
    attn = tokens != 0
    L = max(int(attn.sum(1).max()), 1) if tokens.size else 1
    tokens, attn = tokens[:, :L], attn[:, :L]
    ner = np.asarray(table.ner[news_rows][:, :L], dtype=np.int64)
    ner[ner == NER_IGNORE] = -100
    t = torch.from_numpy
    return {
        "news_rows": t(news_rows.astype(np.int64)),
        "tokens": t(tokens),
        "attention_mask": t(attn.astype(np.int64)),
        "ner": t(ner),
        "category": t(np.asarray(table.category[news_rows], dtype=np.int64)),
        "subcategory": t(np.asarray(table.subcategory[news_rows], dtype=np.int64)),
        "sentiment": t(np.asarray(table.sentiment[news_rows], dtype=np.int64)),
        "entities": t(np.asarray(table.entities[news_rows], dtype=np.int64)),
    }


def _place(
    flat: np.ndarray, lengths: np.ndarray, keep: np.ndarray, rows: int, width: int, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """The last ``keep[i]`` values of slice ``i`` of ``flat`` (slices of ``lengths``) written
    left-aligned into row ``i`` of a ``[rows, width]`` array padded with 0; returns (values,
    mask)."""
    out = np.zeros((rows, width), dtype=dtype)
    mask = np.zeros((rows, width), dtype=bool)
    total = int(keep.sum())
    if total:
        row = np.repeat(np.arange(keep.size), keep)
        col = np.arange(total) - np.repeat(offsets_of(keep)[:-1], keep)
        src = np.repeat(offsets_of(lengths)[:-1] + lengths - keep, keep) + col
        out[row, col] = flat[src]
        mask[row, col] = True
    return out, mask


def collate(
    samples: Impressions | list[Sample],
    table: NewsTable,
    *,
    batch_size: int | None = None,
    history_len: int | None = None,
    dedup: bool = True,
) -> Batch:
    """Build a :class:`Batch` from impressions (columns, or hand-written rows); pad to
    ``batch_size`` samples with masked padding samples. Each history keeps its last
    ``history_len`` news (default: the longest history).

    ``dedup=False`` gives every slot its own row (the naive batch) for equivalence tests and
    the de-duplication benchmark.
    """
    imps = as_impressions(samples)
    n_real = len(imps)
    B = batch_size or n_real
    if n_real > B:
        raise ValueError(f"{n_real} samples do not fit a batch of {B}")
    hist_len, sizes = imps.hist_len.astype(np.int64), imps.sizes.astype(np.int64)
    H = history_len or max(int(hist_len.max()) if n_real else 0, 1)
    C = max(int(sizes.max()) if n_real else 0, 1)
    hist, hist_mask = _place(imps.hist, hist_len, np.minimum(hist_len, H), B, H, np.int64)
    cand, cand_mask = _place(imps.cand, sizes, sizes, B, C, np.int64)
    labels, _ = _place(imps.labels, sizes, sizes, B, C, np.float32)
    sample_mask = np.arange(B) < n_real

    slots = np.concatenate([hist.ravel(), cand.ravel()])  # news row per slot, 0 where masked
    if dedup:
        news_rows, inverse = np.unique(slots, return_inverse=True)
    else:
        news_rows, inverse = slots, np.arange(slots.size)
    hist_idx = inverse[: hist.size].reshape(B, H)
    cand_idx = inverse[hist.size :].reshape(B, C)
    hist_count = np.bincount(hist_idx[hist_mask], minlength=news_rows.size).astype(np.float32)

    pad = B - n_real
    t = torch.from_numpy
    return Batch(
        **news_fields(table, news_rows),
        hist_idx=t(hist_idx.astype(np.int64)),
        hist_mask=t(hist_mask & sample_mask[:, None]),
        cand_idx=t(cand_idx.astype(np.int64)),
        cand_mask=t(cand_mask & sample_mask[:, None]),
        labels=t(labels),
        sample_mask=t(sample_mask),
        hist_count=t(hist_count),
        impression_ids=tuple(imps.ids.tolist()) + ("",) * pad,
        click_pos=t(np.concatenate([imps.click_pos, np.full(pad, -1)]).astype(np.int64)),
        user_idx=t(np.concatenate([imps.user, np.zeros(pad)]).astype(np.int64)),
    )
