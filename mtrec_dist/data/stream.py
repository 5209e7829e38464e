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
* **Columns, not items.** Samples are rows of one
  :class:`~mtrec_dist.data.impressions.Impressions` (docs/design.md §2.2) from the shard group
  to the batch: the negatives are drawn per click into a group's columns, the shuffle buffer
  permutes row indices and gathers, DataLoader workers send chunks of 256 rows, and the
  training process slices batches from them and collates against its own memory-mapped
  :class:`NewsTable`. Per-item IPC, or an object per sample, would cost more than the whole
  pipeline.
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

from mtrec_dist.data.batch import Batch, NewsTable, collate
from mtrec_dist.data.impressions import Impressions, Sample
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
from mtrec_dist.data.shardfile import read_groups
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
        yield from read_groups(found[i], labeled, n_news, n_users)


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


# A worker's samples in flight: the columns and, per sample, whether its negatives are padding
# news (its impression had none; counted by ``TrainLoader.padding_negatives``).
_Rows = tuple[Impressions, np.ndarray]


def _rows_cat(pieces: list[_Rows]) -> _Rows:
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return Impressions.empty(), np.zeros(0, dtype=bool)
    return Impressions.concat([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])


def _rows_gather(rows: _Rows, idx: np.ndarray) -> _Rows:
    return rows[0].gather(idx), rows[1][idx]


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


def _clicks(spec: _WorkerSpec) -> Iterator[_Rows]:
    """One sample per click, one shard group at a time: candidates ``[click, negatives]``
    (``sizes`` 1 + neg_k, ``labels`` 1 then 0), the last ``history_len`` history news, the
    click's position in its impression."""
    rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, spec.worker, 1])
    k, H = spec.neg_k, spec.history_len
    pad = np.zeros(k, dtype=np.int64)
    label_row = np.zeros(1 + k, dtype=np.float32)
    label_row[0] = 1.0
    for shard in spec.shards:
        n = 0
        for g in read_groups(shard, True, spec.n_news, spec.n_users):
            clicked = g.labels == 1
            c_off = offsets_of(g.sizes).tolist()
            h_off = offsets_of(g.hist_len).tolist()
            which: list[int] = []  # impression of each sample (in the group)
            pos_of: list[int] = []
            cands: list[np.ndarray] = []
            hists: list[np.ndarray] = []
            pad_neg: list[bool] = []
            seen = np.concatenate([[0], np.cumsum(clicked)])[c_off]  # clicks before each
            for i in np.flatnonzero(seen[1:] - seen[:-1]).tolist():
                c0, c1 = c_off[i], c_off[i + 1]
                cand, lab = g.cand[c0:c1], clicked[c0:c1]
                neg = cand[~lab]
                hist = g.hist[max(h_off[i], h_off[i + 1] - H) : h_off[i + 1]]
                for p in np.flatnonzero(lab).tolist():
                    if neg.size == 0:
                        negs, padded = pad, True
                    else:
                        negs, padded = rng.choice(neg, size=k, replace=neg.size < k), False
                    which.append(i)
                    pos_of.append(p)
                    cands.append(cand[p : p + 1])
                    cands.append(negs)
                    hists.append(hist)
                    pad_neg.append(padded)
            m = len(which)
            if not m:
                continue
            idx = np.asarray(which, dtype=np.int64)
            hist_len = np.fromiter(map(len, hists), dtype=np.int64, count=m)
            yield (
                Impressions(
                    ids=g.ids[idx], hist=np.concatenate(hists).astype(np.int64, copy=False),
                    hist_len=hist_len, cand=np.concatenate(cands),
                    sizes=np.full(m, 1 + k, dtype=np.int64), labels=np.tile(label_row, m),
                    user=g.user[idx], click_pos=np.asarray(pos_of, dtype=np.int64),
                ),
                np.asarray(pad_neg, dtype=bool),
            )  # fmt: skip
            n += m
        if n != shard.clicks:
            raise DataError(
                shard.path,
                None,
                f"holds {n} clicks but the manifest says {shard.clicks}; re-run `mtrec prepare`",
            )


def _shuffled(pieces: Iterator[_Rows], size: int, rng: np.random.Generator) -> Iterator[_Rows]:
    """Reservoir-style shuffle buffer of ``size`` samples: bounded memory, a pure function of
    ``rng``. Works on sample indices; the columns are gathered once per input piece."""
    if size <= 1:
        yield from pieces
        return
    pool: list[_Rows] = []  # the buffer's rows (compacted) then the pieces read since
    have = 0  # rows in pool
    buf: list[int] = []  # pool row of each buffer slot
    for piece in pieces:
        pool.append(piece)
        out: list[int] = []
        for r in range(have, have + len(piece[0])):
            if len(buf) < size:
                buf.append(r)
                continue
            j = int(rng.integers(size))
            out.append(buf[j])
            buf[j] = r
        have += len(piece[0])
        if not out:
            continue
        whole = _rows_cat(pool)
        yield _rows_gather(whole, np.asarray(out, dtype=np.int64))
        pool, have = [_rows_gather(whole, np.asarray(buf, dtype=np.int64))], len(buf)
        buf = list(range(have))
    whole = _rows_cat(pool)
    order = np.asarray(buf, dtype=np.int64)[rng.permutation(len(buf))]
    if order.size:
        yield _rows_gather(whole, order)


def _worker_chunks(spec: _WorkerSpec) -> Iterator[_Rows]:
    """This worker's chunks; chunk j = samples [j*c, (j+1)*c) minus the first ``skip``."""
    rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, spec.worker, 2])
    c, skip = spec.chunk_size, spec.skip
    pending: list[_Rows] = []
    have = start = 0  # samples pending; stream position of the first of them
    for piece in _shuffled(_clicks(spec), spec.shuffle_buffer, rng):
        pending.append(piece)
        have += len(piece[0])
        while have >= c:
            whole = _rows_cat(pending)
            drop = min(max(skip - start, 0), c)
            yield _rows_slice(whole, drop, c)
            pending, have, start = [_rows_slice(whole, c, have)], have - c, start + c
    if have:
        whole = _rows_cat(pending)
        yield _rows_slice(whole, min(max(skip - start, 0), have), have)


def _rows_slice(rows: _Rows, lo: int, hi: int) -> _Rows:
    return rows[0].slice(lo, hi), rows[1][lo:hi]


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

    def __iter__(self) -> Iterator[_Rows]:
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
        pin_memory: bool = False,
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
        # page-locked batches, so the trainer's copies to the GPU are asynchronous (pin_batches)
        self.pin_memory = pin_memory
        self._started = False

    def __len__(self) -> int:
        """Batches still to come (all of them before iterating)."""
        return self.num_batches - self.batches_done

    def _chunks(self) -> Iterator[_Rows]:
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

    def _emit(self, samples: Impressions) -> Batch:
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
        return b.pin_memory() if self.pin_memory else b

    def __iter__(self) -> Iterator[Batch]:
        if self._started:
            raise RuntimeError("a TrainLoader is iterated once; build one per epoch")
        self._started = True
        bs = self.batch_size
        pending = Impressions.empty()
        for chunk, pad_neg in self._chunks():
            if not len(chunk):
                continue
            self.padding_negatives += int(pad_neg.sum())
            pending = Impressions.concat([pending, chunk]) if len(pending) else chunk
            while len(pending) >= bs:
                yield self._emit(pending.slice(0, bs))
                pending = pending.slice(bs, len(pending))
        while len(pending) or self.batches_done < self.num_batches:
            yield self._emit(pending.slice(0, bs))
            pending = pending.slice(min(bs, len(pending)), len(pending))


# The name the trainers, tests and benchmarks call the loader by.
train_loader = TrainLoader


def pin_batches(use_gpu: bool, cuda_available: bool | None = None) -> bool:
    """Whether the training loader hands out page-locked batches: only for a trainer on the GPU
    (``trainer.use_gpu``) of a CUDA build with a device (``cuda_available``, default: asked of
    torch). Pinning needs CUDA (a CPU-only build raises) and buys nothing for CPU training."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return bool(use_gpu) and bool(cuda_available)


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
        pin_memory=pin_batches(t.use_gpu),
    )
