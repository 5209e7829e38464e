"""Stream prepared shards to training workers as de-duplicated batches.

Data contracts: docs/design.md §2 Data contracts (§2.2 shard sample, §2.4 training sample).

Why it is shaped this way:

* **Shards are the unit of work.** Each epoch the shard list is shuffled by ``(seed, epoch)``
  and dealt to ranks greedily by the manifest's per-shard click counts (longest first), then
  to DataLoader workers the same way. The plan is a pure function of the manifest, so every
  rank computes the same one without talking to the others.
* **Equal batches on every rank.** ``batches_per_epoch`` = ceil(max clicks of a rank /
  batch size), from the manifest alone; a rank that runs out fills with padding samples
  (``sample_mask`` False), a rank without shards yields padding batches only. Collective
  operations (DeepSpeed all-reduces) therefore never wait for a rank that has stopped.
* **One sample per click**, with ``neg_k`` negatives drawn fresh each epoch from the same
  impression's non-clicked candidates (with replacement when there are fewer; the padding
  news, row 0, when there are none) — the NRMS/MTRec training recipe (npratio = 4).
* **Chunks, not items, cross process boundaries.** DataLoader workers pack 256 samples into a
  few flat arrays; the training process unpacks, cuts batches and collates against its own
  memory-mapped :class:`NewsTable`. Per-item IPC would cost more than the whole pipeline.
* **Deterministic and resumable.** The stream is a function of (seed, epoch, rank, world_size,
  loader_workers). The DataLoader returns worker outputs round-robin (a worker that is done
  drops out), so the merged order of chunks is known from the per-worker sample counts; a
  resume with ``skip_samples=n`` replays each worker's stream, drops exactly the samples the
  first ``n`` of the merged stream took from it, and keeps the round structure with empty
  chunks, giving exactly the tail of the uninterrupted run (same samples, same negatives).
* **No pickles.** A shard's tar members are groups of impressions in a raw little-endian
  layout (``mtrec_dist.data.shardfile``), read with the standard library's ``tarfile`` and
  decoded with ``np.frombuffer``; nothing is unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtrec_dist.data.batch import Batch, NewsTable, Sample, collate
from mtrec_dist.data.prepared import (
    MANIFEST,
    Shard,
    is_labeled,
    load_manifest,
    num_users,
    require_labeled,
    shards,
    split_info,
)
from mtrec_dist.data.shardfile import read_groups, read_impressions
from mtrec_dist.data.tables import DataError
from mtrec_dist.utils import offsets_of

CHUNK_SIZE = 256  # samples per worker -> trainer message


# --------------------------------------------------------------------------- plan


def _as_manifest(manifest: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    return manifest if isinstance(manifest, Mapping) else load_manifest(manifest)


def _deal(weights: list[int], order: list[int], bins: int) -> list[list[int]]:
    """Greedy longest-first assignment of items to ``bins`` with balanced total weight.

    Items are taken by weight, descending, ties in ``order``; each goes to the lightest bin
    (lowest index on ties). Each bin lists its items in ``order`` order. Deterministic.
    """
    pos = {item: i for i, item in enumerate(order)}
    load = [0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for item in sorted(order, key=lambda it: (-weights[it], pos[it])):
        b = min(range(bins), key=lambda j: (load[j], j))
        load[b] += weights[item]
        out[b].append(item)
    return [sorted(b, key=pos.__getitem__) for b in out]


def epoch_plan(
    manifest: Mapping[str, Any] | str | Path,
    world_size: int,
    seed: int,
    epoch: int,
    split: str = "train",
) -> list[list[int]]:
    """Shard indices (into the manifest's shard list) of every rank for one epoch.

    The shard order is a permutation seeded by (seed, epoch); shards are dealt to ranks
    balancing their click counts. Identical on every rank: it reads the manifest only.
    """
    info = split_info(_as_manifest(manifest), split)
    clicks = [int(sh["clicks"]) for sh in info["shards"]]
    order = np.random.default_rng([seed, epoch, 0x5D]).permutation(len(clicks)).tolist()
    return _deal(clicks, order, world_size)


def _rank_clicks(manifest: Mapping[str, Any], plan: list[list[int]], split: str) -> list[int]:
    entries = split_info(manifest, split)["shards"]
    return [sum(int(entries[i]["clicks"]) for i in p) for p in plan]


def batches_per_epoch(
    manifest: Mapping[str, Any] | str | Path,
    world_size: int,
    batch_size: int,
    seed: int,
    epoch: int,
    split: str = "train",
) -> int:
    """Batches every rank yields this epoch: ceil(max clicks dealt to a rank / batch_size)."""
    m = _as_manifest(manifest)
    plan = epoch_plan(m, world_size, seed, epoch, split)
    return math.ceil(max(_rank_clicks(m, plan, split)) / batch_size)


# --------------------------------------------------------------------------- shard reading
#
# Shards are read by ``mtrec_dist.data.shardfile`` (the standard library's tarfile, checked
# against the manifest entry in the same pass: end-of-archive marker, every group, ids, rows,
# labels and users in range, then count and sha256 at the end of the shard). Count and hash
# are known only at the end: a consumer sees every impression of an altered shard before the
# error, and the error stops it before it writes any result (predict reads every shard to the
# end in its index step, before scoring).


def _narrow_ids(ids: np.ndarray) -> np.ndarray:
    """A string array at the width of its longest id (``'<U1'`` when empty): the dtype
    ``np.asarray(list_of_ids, dtype=str)`` gives, whatever the pieces it was joined from."""
    width = max(int(np.char.str_len(ids).max()), 1) if ids.size else 1
    return ids.astype(f"<U{width}", copy=False)


@dataclass
class Impressions:
    """Consecutive impressions of a split as flat arrays: what the evaluator reads and scores.

    One per shard group from :func:`eval_groups`; sliced and joined into parts and chunks
    without a Python object per impression, which cost more CPU than reading and checking the
    shards themselves (``bench/bench_eval.py``, ``read_part``). :meth:`samples` is the
    per-impression view for the code that needs :class:`Sample` objects (``collate``).
    """

    ids: np.ndarray  # [n] str, impression ids exactly as the source spells them
    sizes: np.ndarray  # [n] int64, candidates per impression
    cand: np.ndarray  # [sum sizes] int64 news rows (0 = a candidate missing from the table)
    labels: np.ndarray  # [sum sizes] float32 0/1 (zeros for an unlabeled split)
    hist_len: np.ndarray  # [n] int64
    hist: np.ndarray  # [sum hist_len] int64 news rows, oldest first
    user: np.ndarray  # [n] int64 user index (0 = unknown)

    def __len__(self) -> int:
        return int(self.sizes.size)

    def slice(self, lo: int, hi: int) -> Impressions:
        """Impressions ``[lo, hi)`` (views of these arrays)."""
        h0, h1 = int(self.hist_len[:lo].sum()), int(self.hist_len[:hi].sum())
        c0, c1 = int(self.sizes[:lo].sum()), int(self.sizes[:hi].sum())
        return Impressions(
            self.ids[lo:hi], self.sizes[lo:hi], self.cand[c0:c1], self.labels[c0:c1],
            self.hist_len[lo:hi], self.hist[h0:h1], self.user[lo:hi],
        )  # fmt: skip

    @classmethod
    def concat(cls, pieces: list[Impressions]) -> Impressions:
        """The impressions of ``pieces`` one after another (ids at the width of the longest)."""
        if len(pieces) == 1:
            return replace(pieces[0], ids=_narrow_ids(pieces[0].ids))
        if not pieces:
            z = np.zeros(0, dtype=np.int64)
            return cls(np.zeros(0, "<U1"), z, z, np.zeros(0, np.float32), z, z, z)
        cat = np.concatenate
        return cls(
            _narrow_ids(cat([p.ids for p in pieces])), cat([p.sizes for p in pieces]),
            cat([p.cand for p in pieces]), cat([p.labels for p in pieces]),
            cat([p.hist_len for p in pieces]), cat([p.hist for p in pieces]),
            cat([p.user for p in pieces]),
        )  # fmt: skip

    @classmethod
    def from_samples(cls, samples: Iterable[Sample]) -> Impressions:
        """Evaluation samples (``click_pos`` -1, every candidate) as flat arrays."""
        samples = list(samples)
        if not samples:
            return cls.concat([])
        n = len(samples)
        return cls(
            ids=np.asarray([str(s.impression_id) for s in samples], dtype=str),
            sizes=np.fromiter((len(s.cand) for s in samples), dtype=np.int64, count=n),
            cand=np.concatenate([s.cand for s in samples]).astype(np.int64),
            labels=np.concatenate([s.labels for s in samples]).astype(np.float32),
            hist_len=np.fromiter((len(s.hist) for s in samples), dtype=np.int64, count=n),
            hist=np.concatenate([s.hist for s in samples]).astype(np.int64),
            user=np.fromiter((s.user for s in samples), dtype=np.int64, count=n),
        )

    def samples(self) -> Iterator[Sample]:
        """One :class:`Sample` per impression (views of these arrays)."""
        h, c = offsets_of(self.hist_len).tolist(), offsets_of(self.sizes).tolist()
        for i, (key, user) in enumerate(zip(self.ids.tolist(), self.user.tolist())):
            yield Sample(
                key, self.hist[h[i] : h[i + 1]], self.cand[c[i] : c[i + 1]],
                self.labels[c[i] : c[i + 1]], user=user,
            )  # fmt: skip


def eval_groups(
    prepared_dir: str | Path, split: str, *, shard_indices: list[int] | None = None
) -> Iterator[Impressions]:
    """Every impression of a split with all its candidates, one shard group at a time.

    Order: shards in ``shard_indices`` order (default all), groups and impressions in shard
    order; ids are the source file's strings, ``labels`` zeros for an unlabeled split. Each
    shard is checked against the manifest as it is read (see the section comment above).
    """
    manifest = load_manifest(prepared_dir)
    found = shards(prepared_dir, manifest, split)
    labeled = is_labeled(manifest, split, prepared_dir)
    n_news, n_users = int(manifest["news"]["count"]), num_users(manifest)
    for i in range(len(found)) if shard_indices is None else shard_indices:
        for g in read_groups(found[i], labeled, n_news, n_users):
            yield Impressions(
                ids=np.asarray(g.ids, dtype=str),
                sizes=g.cand_len.astype(np.int64),
                cand=g.cand,
                labels=g.label.astype(np.float32),
                hist_len=g.hist_len.astype(np.int64),
                hist=g.hist,
                user=g.user,
            )


def take(
    pieces: Iterable[Impressions], skip: int = 0, count: int | None = None
) -> Iterator[Impressions]:
    """Impressions ``[skip, skip + count)`` of the stream ``pieces`` (``count=None``: to the
    end), as slices of its pieces; stops reading once the last one is read."""
    end = None if count is None else skip + count
    pos = 0
    for p in pieces:
        lo, pos = pos, pos + len(p)
        a, b = max(skip - lo, 0), len(p) if end is None else min(end - lo, len(p))
        if b > a:
            yield p if (a, b) == (0, len(p)) else p.slice(a, b)
        if end is not None and pos >= end:
            return


def rechunk(pieces: Iterable[Impressions], size: int) -> Iterator[Impressions]:
    """The stream ``pieces`` cut into chunks of exactly ``size`` impressions (the last one
    shorter): the same chunks whatever the pieces were."""
    buf: list[Impressions] = []
    have = 0
    for p in pieces:
        buf.append(p)
        have += len(p)
        while have >= size:
            whole = Impressions.concat(buf)
            yield whole.slice(0, size)
            have -= size
            buf = [whole.slice(size, size + have)] if have else []
    if have:
        yield Impressions.concat(buf)


def eval_impressions(
    prepared_dir: str | Path, split: str, *, shard_indices: list[int] | None = None
) -> Iterator[Sample]:
    """:func:`eval_groups` one :class:`Sample` at a time (``labels`` float32, ``click_pos``
    -1): the per-impression view for tests and tools that want objects."""
    for g in eval_groups(prepared_dir, split, shard_indices=shard_indices):
        yield from g.samples()


# --------------------------------------------------------------------------- worker side


@dataclass
class _Packed:
    """A chunk of samples as a few flat arrays: cheap to pickle between processes."""

    imp: np.ndarray  # [n] str, impression ids as the source spells them
    click_pos: np.ndarray  # [n] int64
    cand: np.ndarray  # [n, 1+K] int64, click first
    hist: np.ndarray  # [sum h] int64
    hist_len: np.ndarray  # [n] int64
    pad_neg: np.ndarray  # [n] bool, negatives are padding news (impression had none)
    user: np.ndarray  # [n] int64 user index (0 = unknown)

    def __len__(self) -> int:
        return int(self.imp.size)


_Row = tuple[str, int, np.ndarray, np.ndarray, bool, int]


def _pack(rows: list[_Row], k: int) -> _Packed:
    n = len(rows)
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        ids = np.zeros(0, dtype=str)
        return _Packed(ids, z, np.zeros((0, k + 1), np.int64), z, z, np.zeros(0, bool), z)
    return _Packed(
        imp=np.array([r[0] for r in rows], dtype=str),
        click_pos=np.array([r[1] for r in rows], dtype=np.int64),
        cand=np.stack([r[2] for r in rows]),
        hist=np.concatenate([r[3] for r in rows]),
        hist_len=np.array([r[3].size for r in rows], dtype=np.int64),
        pad_neg=np.array([r[4] for r in rows], dtype=bool),
        user=np.array([r[5] for r in rows], dtype=np.int64),
    )


def _unpack(p: _Packed, labels: np.ndarray) -> list[Sample]:
    hists = np.split(p.hist, np.cumsum(p.hist_len)[:-1]) if len(p) else []
    return [
        Sample(i, h, c, labels, int(cp), user=u)
        for i, h, c, cp, u in zip(
            p.imp.tolist(), hists, p.cand, p.click_pos.tolist(), p.user.tolist()
        )
    ]


@dataclass
class _WorkerSpec:
    """Everything one loader worker needs; plain data so that it pickles to workers."""

    shards: list[Shard]  # manifest entries; clicks, count and sha256 checked while reading
    n_news: int  # rows of the news table, for the range checks
    n_users: int | None  # rows of the user vocabulary; None = folder without users (all 0)
    seed: int
    epoch: int
    rank: int
    worker: int
    neg_k: int
    history_len: int
    shuffle_buffer: int
    skip: int  # samples of this worker's stream already consumed
    chunk_size: int


def _clicks(spec: _WorkerSpec) -> Iterator[_Row]:
    """One row per click: (impression id, click position, [click, negatives], hist, pad_neg,
    user)."""
    rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, spec.worker, 1])
    k, H = spec.neg_k, spec.history_len
    pad = np.zeros(k, dtype=np.int64)
    for shard in spec.shards:
        n = 0
        for imp, hist, cand, label, user in read_impressions(
            shard, True, spec.n_news, spec.n_users
        ):
            pos = np.flatnonzero(label == 1)
            if pos.size == 0:
                continue
            neg = cand[label == 0]
            hist = hist[-H:] if hist.size > H else hist
            for p in pos.tolist():
                if neg.size == 0:
                    negs, pad_neg = pad, True
                else:
                    negs, pad_neg = rng.choice(neg, size=k, replace=neg.size < k), False
                yield imp, p, np.concatenate([cand[p : p + 1], negs]), hist, pad_neg, user
            n += pos.size
        if n != shard.clicks:
            raise DataError(
                shard.path,
                None,
                f"holds {n} clicks but the manifest says {shard.clicks}; re-run `mtrec prepare`",
            )


def _shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Reservoir-style shuffle buffer: bounded memory, a pure function of ``rng``."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = it
    for j in rng.permutation(len(buf)).tolist():
        yield buf[j]


def _worker_chunks(spec: _WorkerSpec) -> Iterator[_Packed]:
    """This worker's chunks; chunk j = samples [j*c, (j+1)*c) minus the first ``skip``."""
    rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, spec.worker, 2])
    c, skip = spec.chunk_size, spec.skip
    rows: list[_Row] = []
    i = 0
    for row in _shuffled(_clicks(spec), spec.shuffle_buffer, rng):
        if i >= skip:
            rows.append(row)
        i += 1
        if i % c == 0:
            yield _pack(rows, spec.neg_k)
            rows = []
    if i % c:
        yield _pack(rows, spec.neg_k)


def _merged_skips(counts: list[int], chunk: int, n: int) -> list[int]:
    """Samples each worker contributed to the first ``n`` of the round-robin merged stream."""
    skips = [0] * len(counts)
    left, r = n, 0
    while left > 0:
        took = False
        for w, c in enumerate(counts):
            size = min(chunk, c - r * chunk)
            if size <= 0:
                continue
            take = min(size, left)
            skips[w] += take
            left -= take
            took = True
            if left == 0:
                break
        if not took:
            raise ValueError(f"skip_samples={n} exceeds the {sum(counts)} samples of this rank")
        r += 1
    return skips


class _ShardWorkers(IterableDataset):
    """The DataLoader side: worker ``w`` runs ``specs[w]`` and yields packed chunks."""

    def __init__(self, specs: list[_WorkerSpec]):
        self.specs = specs

    def __iter__(self) -> Iterator[_Packed]:
        info = get_worker_info()
        w = 0 if info is None else info.id
        if (1 if info is None else info.num_workers) != len(self.specs):
            raise RuntimeError(f"planned {len(self.specs)} loader workers, got {info}")
        yield from _worker_chunks(self.specs[w])


def _identity(x: Any) -> Any:
    return x


# --------------------------------------------------------------------------- training process


def _check_loader_args(*, rank: int, world_size: int, **lower_bounded: int) -> None:
    """ValueError naming the argument: integers with their lower bounds, rank in range."""
    lows = {"world_size": 1, "batch_size": 1, "neg_k": 1, "history_len": 1, "chunk_size": 1}
    for name, v in {"world_size": world_size, **lower_bounded}.items():
        lo = lows.get(name, 0)
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"train_loader: {name} must be an integer >= {lo}, got {v!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"train_loader: rank {rank} outside [0, {world_size})")


def _resume_point(
    skip_samples: int | None,
    skip_batches: int | None,
    batch_size: int,
    total: int,
    num_batches: int,
    rank: int,
) -> tuple[int, int]:
    """(samples, batches) already consumed this epoch; either may be derived from the other,
    and together they must sit on a batch boundary of this rank."""
    if skip_samples is None:  # derived from the batch index (what a checkpoint stores)
        skip_samples = min((skip_batches or 0) * batch_size, total)
    if skip_samples > total:
        raise ValueError(f"skip_samples={skip_samples} > {total} samples of rank {rank}")
    if skip_batches is None:
        if skip_samples < total and skip_samples % batch_size:
            raise ValueError(
                f"skip_samples={skip_samples} is not a multiple of batch_size={batch_size}"
            )
        skip_batches = math.ceil(skip_samples / batch_size)
    if not 0 <= skip_batches <= num_batches or skip_samples != min(
        skip_batches * batch_size, total
    ):
        raise ValueError(
            f"skip_samples={skip_samples}, skip_batches={skip_batches} do not match a batch "
            f"boundary of rank {rank} ({total} samples, {num_batches} batches)"
        )
    return skip_samples, skip_batches


class TrainLoader:
    """This rank's training batches for ``epoch``: exactly ``batches_per_epoch(...)`` of them;
    iterate once.

    ``skip_samples`` (with ``skip_batches`` when the rank had already run out of samples and
    yielded padding batches) resumes mid-epoch: the remaining batches equal those of the
    uninterrupted run. ``skip_samples=None`` derives it from ``skip_batches`` (all a checkpoint
    needs to store). The stream is deterministic for (seed, epoch, rank, world_size,
    loader_workers, chunk_size, shuffle_buffer, neg_k).

    After each yielded batch, ``position`` is the number of real samples of this epoch consumed
    (including skipped ones) and ``batches_done`` the batch index reached; a checkpoint stores
    both and resumes with ``skip_samples=position, skip_batches=batches_done``.
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        epoch: int,
        seed: int,
        neg_k: int = 4,
        history_len: int = 50,
        shuffle_buffer: int = 2048,
        loader_workers: int = 2,
        dedup: bool = True,
        skip_samples: int | None = 0,
        skip_batches: int | None = None,
        split: str = "train",
        chunk_size: int = CHUNK_SIZE,
    ):
        _check_loader_args(
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            neg_k=neg_k,
            history_len=history_len,
            shuffle_buffer=shuffle_buffer,
            loader_workers=loader_workers,
            epoch=epoch,
            seed=seed,
            skip_samples=0 if skip_samples is None else skip_samples,
            chunk_size=chunk_size,
        )
        self.dir = Path(prepared_dir)
        manifest = load_manifest(self.dir)
        require_labeled(manifest, split, self.dir, ": the training stream needs clicks")
        found = shards(self.dir, manifest, split)
        self.table = NewsTable(self.dir)
        self.batch_size, self.history_len, self.dedup = batch_size, history_len, dedup
        self.neg_k = neg_k

        plan = epoch_plan(manifest, world_size, seed, epoch, split)
        self.shards = plan[rank]  # shard indices of this rank, in stream order
        clicks = [sh.clicks for sh in found]
        self.total = sum(clicks[i] for i in self.shards)  # real samples of this rank
        self.num_batches = math.ceil(max(_rank_clicks(manifest, plan, split)) / batch_size)
        skip_samples, skip_batches = _resume_point(
            skip_samples, skip_batches, batch_size, self.total, self.num_batches, rank
        )
        self.position, self.batches_done = skip_samples, skip_batches
        self.padding_negatives = 0  # samples whose impression had no negative (row 0 used)

        per_worker = _deal(clicks, self.shards, max(loader_workers, 1))
        counts = [sum(clicks[i] for i in ws) for ws in per_worker]
        skips = _merged_skips(counts, chunk_size, skip_samples)
        self.specs = [
            _WorkerSpec(
                shards=[found[i] for i in ws],
                n_news=int(manifest["news"]["count"]),
                n_users=num_users(manifest),
                seed=seed,
                epoch=epoch,
                rank=rank,
                worker=w,
                neg_k=neg_k,
                history_len=history_len,
                shuffle_buffer=shuffle_buffer,
                skip=skips[w],
                chunk_size=chunk_size,
            )
            for w, ws in enumerate(per_worker)
        ]
        self.loader_workers = loader_workers
        self._labels = np.zeros(1 + neg_k, dtype=np.float32)
        self._labels[0] = 1.0
        self._labels.setflags(write=False)
        self._started = False

    def __len__(self) -> int:
        """Batches still to come (all of them before iterating)."""
        return self.num_batches - self.batches_done

    def _chunks(self) -> Iterator[_Packed]:
        if self.loader_workers == 0:
            yield from _worker_chunks(self.specs[0])
            return
        dl = DataLoader(
            _ShardWorkers(self.specs),
            batch_size=None,
            num_workers=self.loader_workers,
            collate_fn=_identity,
            prefetch_factor=4,
            # its own generator: starting the workers must not draw from the global torch
            # generator the training step's dropout uses (a resume restores that one exactly)
            generator=torch.Generator().manual_seed(0),
        )
        yield from dl

    def _emit(self, samples: list[Sample]) -> Batch:
        if self.batches_done >= self.num_batches:
            raise DataError(
                self.dir / MANIFEST, None, "shards hold more clicks than the manifest says"
            )
        b = collate(
            samples,
            self.table,
            batch_size=self.batch_size,
            history_len=self.history_len,
            dedup=self.dedup,
        )
        C = 1 + self.neg_k
        if b.cand_idx.shape[1] < C:  # padding-only batch: keep the candidate shape uniform
            extra = C - b.cand_idx.shape[1]
            b = replace(
                b,
                cand_idx=torch.nn.functional.pad(b.cand_idx, (0, extra)),
                cand_mask=torch.nn.functional.pad(b.cand_mask, (0, extra)),
                labels=torch.nn.functional.pad(b.labels, (0, extra)),
            )
        self.position += len(samples)
        self.batches_done += 1
        return b

    def __iter__(self) -> Iterator[Batch]:
        if self._started:
            raise RuntimeError("a TrainLoader is iterated once; build one per epoch")
        self._started = True
        bs = self.batch_size
        pending: list[Sample] = []
        for packed in self._chunks():
            if not len(packed):
                continue
            self.padding_negatives += int(packed.pad_neg.sum())
            pending.extend(_unpack(packed, self._labels))
            while len(pending) >= bs:
                yield self._emit(pending[:bs])
                del pending[:bs]
        while pending or self.batches_done < self.num_batches:
            yield self._emit(pending[:bs])
            del pending[:bs]


# The name the trainers, tests and benchmarks call the loader by.
train_loader = TrainLoader


def loader_for(
    cfg, *, rank: int, world_size: int, epoch: int, skip_batches: int = 0
) -> TrainLoader:
    """The training stream exactly as ``cfg`` (a mtrec_dist Config) describes it: the one place
    the trainers (and their equivalence tests) turn the config into loader arguments."""
    t, d = cfg.trainer, cfg.data
    return train_loader(
        cfg.prepared_dir,
        rank=rank,
        world_size=world_size,
        batch_size=t.micro_batch,
        epoch=epoch,
        seed=t.seed,
        neg_k=d.neg_k,
        history_len=d.history_len,
        shuffle_buffer=d.shuffle_buffer,
        loader_workers=d.loader_workers,
        skip_samples=None,
        skip_batches=skip_batches,
    )
