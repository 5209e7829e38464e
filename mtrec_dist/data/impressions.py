"""Impressions as columns: the one representation of impressions from the shard reader to the
collate step and the evaluator (docs/design.md §2 Data contracts, §2.2 and §2.4).

Field names, the same everywhere (shard reader, training stream, collate, evaluator parts)::

    ids        [n]             str    impression ids exactly as the source spells them ("003")
    hist       [sum hist_len]  int64  news rows, impression after impression, oldest first
    hist_len   [n]             int64  history length of each impression
    cand       [sum sizes]     int64  news rows (0 = a candidate missing from the news table);
                                      a training sample's clicked news first
    sizes      [n]             int64  candidates of each impression
    labels     [sum sizes]     float32 0/1 per candidate (zeros for an unlabeled split)
    user       [n]             int64  user index (vocab/users.json; 0 = unknown)
    click_pos  [n]             int64  training: the click's position in its impression; -1 else

Why one columnar type: a Python object per impression (or per click) cost more CPU than reading
and checking the shards themselves (``bench/bench_eval.py``, ``bench/bench_stream.py``); the
pipeline slices, gathers and concatenates these arrays and never builds an object per row.
:class:`Sample` is the one-row view with the same names, for tests and tools that write
impressions by hand; :meth:`Impressions.from_samples` turns such rows into columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from mtrec_dist.utils import offsets_of

_I8 = np.int64


def _narrow_ids(ids: np.ndarray) -> np.ndarray:
    """A string array at the width of its longest id (``'<U1'`` when empty): the dtype
    ``np.asarray(list_of_ids, dtype=str)`` gives, whatever the pieces it was joined from."""
    width = max(int(np.char.str_len(ids).max()), 1) if ids.size else 1
    return ids.astype(f"<U{width}", copy=False)


def _ranges(offsets: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Flat positions of the slices ``idx`` of a flat array with these ``offsets`` (in order)."""
    start, n = offsets[idx], offsets[idx + 1] - offsets[idx]
    total = int(n.sum())
    if total == 0:
        return np.zeros(0, dtype=_I8)
    out_off = offsets_of(n)
    return np.arange(total, dtype=_I8) - np.repeat(out_off[:-1] - start, n)


@dataclass
class Sample:
    """One impression (or one training sample) as a row: the view of :class:`Impressions` for
    code that writes impressions by hand (tests, tools); the pipeline never builds one."""

    impression_id: str  # exactly as the source file spells it ("003" stays "003")
    hist: np.ndarray  # int64 [h] news rows, most recent last
    cand: np.ndarray  # int64 [C] news rows; in training the clicked one first
    labels: np.ndarray  # float32 [C]
    click_pos: int = -1  # training: position of the click in the impression (audit/resume)
    user: int = 0  # user index for user-ID models (LSTUR, NPA); 0 = unknown user


@dataclass
class Impressions:
    """Consecutive impressions (or training samples) as flat columns; names in the module
    docstring. Sliced, gathered and joined without an object per row."""

    ids: np.ndarray  # [n] str
    hist: np.ndarray  # [sum hist_len] int64
    hist_len: np.ndarray  # [n] int64
    cand: np.ndarray  # [sum sizes] int64
    sizes: np.ndarray  # [n] int64
    labels: np.ndarray  # [sum sizes] float32
    user: np.ndarray  # [n] int64
    click_pos: np.ndarray  # [n] int64, -1 outside training

    def __len__(self) -> int:
        return int(self.sizes.size)

    @classmethod
    def empty(cls) -> Impressions:
        z = np.zeros(0, dtype=_I8)
        return cls(np.zeros(0, "<U1"), z, z, z, z, np.zeros(0, np.float32), z, z)

    def slice(self, lo: int, hi: int) -> Impressions:
        """Impressions ``[lo, hi)`` (views of these arrays)."""
        h0, h1 = int(self.hist_len[:lo].sum()), int(self.hist_len[:hi].sum())
        c0, c1 = int(self.sizes[:lo].sum()), int(self.sizes[:hi].sum())
        return Impressions(
            self.ids[lo:hi], self.hist[h0:h1], self.hist_len[lo:hi], self.cand[c0:c1],
            self.sizes[lo:hi], self.labels[c0:c1], self.user[lo:hi], self.click_pos[lo:hi],
        )  # fmt: skip

    def gather(self, idx: np.ndarray) -> Impressions:
        """Impressions ``idx`` (any order, repeats allowed) as new arrays."""
        idx = np.asarray(idx, dtype=_I8)
        h = _ranges(offsets_of(self.hist_len), idx)
        c = _ranges(offsets_of(self.sizes), idx)
        return Impressions(
            self.ids[idx], self.hist[h], self.hist_len[idx], self.cand[c], self.sizes[idx],
            self.labels[c], self.user[idx], self.click_pos[idx],
        )  # fmt: skip

    @classmethod
    def concat(cls, pieces: list[Impressions]) -> Impressions:
        """The impressions of ``pieces`` one after another (ids at the width of the longest)."""
        if not pieces:
            return cls.empty()
        if len(pieces) == 1:
            p = pieces[0]
            return cls(
                _narrow_ids(p.ids), p.hist, p.hist_len, p.cand, p.sizes, p.labels, p.user,
                p.click_pos,
            )  # fmt: skip
        cat = np.concatenate
        return cls(
            _narrow_ids(cat([p.ids for p in pieces])), cat([p.hist for p in pieces]),
            cat([p.hist_len for p in pieces]), cat([p.cand for p in pieces]),
            cat([p.sizes for p in pieces]), cat([p.labels for p in pieces]),
            cat([p.user for p in pieces]), cat([p.click_pos for p in pieces]),
        )  # fmt: skip

    @classmethod
    def from_samples(cls, samples: Iterable[Sample]) -> Impressions:
        """Hand-written rows as columns (dtypes as in the module docstring)."""
        samples = list(samples)
        if not samples:
            return cls.empty()
        n = len(samples)

        def flat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate([np.asarray(a, dtype=dtype).reshape(-1) for a in arrays])

        return cls(
            ids=np.asarray([str(s.impression_id) for s in samples], dtype=str),
            hist=flat([s.hist for s in samples], _I8),
            hist_len=np.fromiter((len(s.hist) for s in samples), dtype=_I8, count=n),
            cand=flat([s.cand for s in samples], _I8),
            sizes=np.fromiter((len(s.cand) for s in samples), dtype=_I8, count=n),
            labels=flat([s.labels for s in samples], np.float32),
            user=np.fromiter((int(s.user) for s in samples), dtype=_I8, count=n),
            click_pos=np.fromiter((int(s.click_pos) for s in samples), dtype=_I8, count=n),
        )

    def samples(self) -> Iterator[Sample]:
        """One :class:`Sample` per impression (views of these arrays)."""
        h, c = offsets_of(self.hist_len).tolist(), offsets_of(self.sizes).tolist()
        rows = zip(self.ids.tolist(), self.user.tolist(), self.click_pos.tolist())
        for i, (key, user, pos) in enumerate(rows):
            yield Sample(
                key, self.hist[h[i] : h[i + 1]], self.cand[c[i] : c[i + 1]],
                self.labels[c[i] : c[i + 1]], click_pos=pos, user=user,
            )  # fmt: skip


def as_impressions(x: Impressions | Iterable[Sample]) -> Impressions:
    """Columns from columns or from hand-written rows."""
    return x if isinstance(x, Impressions) else Impressions.from_samples(x)
