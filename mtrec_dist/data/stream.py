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
* **No pickles.** Tar members are read by the small reader below (:func:`_tar_members`: ustar,
  pax and GNU headers) and decoded with ``np.load(..., allow_pickle=False)``; nothing else is
  decoded.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtrec_dist.data.batch import Batch, NewsTable, Sample, collate
from mtrec_dist.data.prepared import (
    CAND,
    HIST,
    LABEL,
    MANIFEST,
    SHARD_MEMBERS,
    USER,
    Shard,
    check_impression_id,
    is_labeled,
    load_manifest,
    num_users,
    require_labeled,
    required_members,
    shards,
    split_info,
)
from mtrec_dist.data.tables import DataError
from mtrec_dist.utils import sha256_file

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
# A shard is checked against its manifest entry while it is read, in one pass: every tar header
# checksum, every sample's members, ids and labels (range-checked against the news table), the
# tar end-of-archive marker (a file cut anywhere, even between samples, is "truncated"), then
# the impression count and the sha256 of the whole file (a second read of the file, from the
# page cache: about 5% of the parse, see bench/bench_shard_check.py). Count and hash are known
# only at the end of the shard: a consumer sees
# every sample of an altered shard before the error, and the error stops it before it writes
# any result (predict reads every shard to the end in its index step, before scoring).


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(
    r"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': (?:False|True), 'shape': \((\d*),?\), \}"
)
_npy_cache: dict[bytes, tuple[np.dtype, int]] = {}
_BLOCK = 1 << 20


def _at(i: int, key: str) -> str:
    """How errors name a sample: its position in the shard and its key (impression id)."""
    return f"sample #{i} (key {key!r})"


def _npy(data: bytes, path: Path, i: int, key: str, member: str) -> np.ndarray:
    """Decode one .npy payload without pickles.

    Fast path for the 1-D plain-integer arrays of the shards: the header (a few distinct ones
    per shard) is parsed once and cached, the payload read with ``np.frombuffer``. Anything
    else goes through ``np.load(allow_pickle=False)``, which refuses object arrays.
    """
    if data[:6] == _NPY_MAGIC and data[6:7] == b"\x01":
        hlen = 10 + int.from_bytes(data[8:10], "little")
        header = data[10:hlen]
        hit = _npy_cache.get(header)
        if hit is None:
            m = _NPY_HEADER.match(header.decode("latin1").rstrip())
            if m is not None:
                hit = (np.dtype(m.group(1)), int(m.group(2) or 1))
                if len(_npy_cache) < 4096:
                    _npy_cache[header] = hit
        if hit is not None:
            dtype, n = hit
            if len(data) - hlen == n * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=n, offset=hlen)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # object arrays (pickles), truncated or corrupt headers, not npy
        raise DataError(
            path, None, f"{_at(i, key)}: {member} is not a plain .npy array ({e})"
        ) from e


def _octal(field: bytes, path: Path, where: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)
    except ValueError:
        raise DataError(path, None, f"{where}: corrupt tar header field {field!r}") from None


def _pax(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data):
        sp = data.index(b" ", i)
        n = int(data[i:sp])
        k, _, v = data[sp + 1 : i + n - 1].partition(b"=")
        out[k.decode("utf-8")] = v.decode("utf-8")
        i += n
    return out


def _member_name(hdr: bytes, pax: dict[str, str], longname: str | None) -> str:
    if "path" in pax:
        return pax["path"]
    if longname is not None:
        return longname
    name = hdr[:100].split(b"\0", 1)[0].decode("utf-8")
    if hdr[257:262] == b"ustar" and hdr[345] != 0:
        name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
    return name


def _tar_members(path: Path, f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(member name, payload) of the regular files of an uncompressed tar, in order.

    A minimal ustar/pax/GNU reader: ``tarfile`` spends ~4x longer per member on the pax
    headers webdataset writes, and a shard holds 3 members per impression. Header checksums
    are verified; anything not a regular file is skipped unread. The archive must end with
    the end-of-archive block: a file that stops anywhere before it is "truncated".
    """
    pax: dict[str, str] = {}
    longname: str | None = None
    last = "the start of the file"
    while True:
        where = f"after {last}"
        hdr = f.read(512)
        if len(hdr) < 512:
            raise DataError(
                path,
                None,
                f"truncated: the file ends {where} without the tar end-of-archive marker; "
                "re-run `mtrec prepare`",
            )
        if hdr.count(0) == 512:  # end-of-archive block
            return
        chk = _octal(hdr[148:156], path, where)
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise DataError(
                path, None, f"{where}: tar header checksum mismatch; re-run `mtrec prepare`"
            )
        size = int(pax["size"]) if "size" in pax else _octal(hdr[124:136], path, where)
        kind = hdr[156:157]
        data = f.read(size)
        pad = (-size) % 512
        if len(data) < size or len(f.read(pad)) < pad:
            raise DataError(
                path, None, f"truncated: the file ends {where} inside a tar member; "
                "re-run `mtrec prepare`",
            )  # fmt: skip
        if kind == b"x":
            pax = _pax(data)
            continue
        if kind == b"L":
            longname = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind in (b"0", b"\0", b"7"):
            name = _member_name(hdr, pax, longname)
            last = f"member {name!r}"
            yield name, data
        pax, longname = {}, None


def iter_shard(
    path: str | Path, expect: Shard | None = None
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield ``(key, {"hist.npy": .., "cand.npy": .., ["label.npy": ..], ["user.npy": ..]})``
    in tar order.

    Members other than the shard members are ignored, never decoded. With ``expect`` (the
    shard's manifest entry), the impression count and the sha256 are checked once the file is
    read to its end.
    """
    path = Path(path)
    with open(path, "rb", buffering=_BLOCK) as f:
        head = f.peek(512)[:512]
        if len(head) == 512 and head[257:262] != b"ustar" and head.count(0) != 512:
            raise DataError(path, None, "not an uncompressed tar shard; re-run `mtrec prepare`")
        n, key, cur = 0, None, {}
        for name, data in _tar_members(path, f):
            k, _, ext = name.rsplit("/", 1)[-1].partition(".")
            if k != key:
                if key is not None:
                    yield key, cur
                    n += 1
                key, cur = k, {}
            if ext in SHARD_MEMBERS:
                cur[ext] = _npy(data, path, n, k, ext)
        if key is not None:
            yield key, cur
            n += 1
        if expect is not None:
            _check_whole(path, n, expect)


def _check_whole(path: Path, n: int, expect: Shard) -> None:
    if n != expect.impressions:
        raise DataError(
            path,
            None,
            f"holds {n} impressions but the manifest says {expect.impressions} (truncated or "
            "altered); re-run `mtrec prepare`",
        )
    digest = sha256_file(path)  # a second read, from the page cache: ~5% of the parse
    if digest != expect.sha256:
        raise DataError(
            path,
            None,
            f"sha256 {digest} differs from the manifest's {expect.sha256}: the shard was "
            "altered after `mtrec prepare`; re-run it",
        )


def _ids(a: np.ndarray, lo: int, n_news: int, path: Path, where: str, member: str) -> np.ndarray:
    """News rows of one member as int64, each in ``[lo, n_news)`` (the news table's rows)."""
    if a.dtype.kind not in "iu":
        raise DataError(path, None, f"{where}: {member} has dtype {a.dtype}, expected integers")
    a = a.reshape(-1)
    if (
        a.dtype.itemsize == 4 and a.dtype.isnative
    ):  # what prepare writes: one unsigned reduction checks both ends
        bad = a.size and (a.view(np.uint32) - np.uint32(lo)).max() >= n_news - lo
    else:
        bad = a.size and (a.min() < lo or a.max() >= n_news)
    a = a.astype(np.int64, copy=False)
    if bad:
        bad = int(a[(a < lo) | (a >= n_news)][0])
        raise DataError(
            path, None, f"{where}: {member} holds news row {bad}, expected {lo} <= row < {n_news} "
            "(the news table's rows); re-run `mtrec prepare`",
        )  # fmt: skip
    return a


def _impressions(
    shard: Shard, labeled: bool, n_news: int, n_users: int | None = None
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, int]]:
    """(impression id, hist int64, cand int64, label uint8, user) per sample of one shard,
    checked: history rows in [1, n_news) (prepare drops history news missing from the table),
    candidate rows in [0, n_news) (0 = missing news), labels 0 or 1, one per candidate, the user
    index in [0, n_users). ``n_users=None`` (a folder prepared before users were recorded):
    ``user.npy`` is not required and every impression is user 0."""
    path = shard.path
    need = required_members(labeled, n_users is not None)
    for i, (key, d) in enumerate(iter_shard(path, shard)):
        where = _at(i, key)
        why = check_impression_id(key)
        if why is not None:
            raise DataError(path, None, f"{where}: impression id {why}")
        missing = [m for m in need if m not in d]
        if missing:
            hint = (
                "; the manifest declares users (news.vocab.users) but this shard has none: "
                "re-run `mtrec prepare`"
                if missing == [USER]
                else ""
            )
            raise DataError(path, None, f"{where}: missing {missing}{hint}")
        hist = _ids(d[HIST], 1, n_news, path, where, HIST)
        cand = _ids(d[CAND], 0, n_news, path, where, CAND)
        user = 0
        if n_users is not None:
            u = d[USER]
            if u.dtype.kind not in "iu" or u.size != 1 or not 0 <= int(u.reshape(-1)[0]) < n_users:
                raise DataError(
                    path, None, f"{where}: {USER} holds {u.tolist()} ({u.dtype}), expected one "
                    f"user index in [0, {n_users}) (news.vocab.users); re-run `mtrec prepare`",
                )  # fmt: skip
            user = int(u.reshape(-1)[0])
        if labeled:
            label = d[LABEL].reshape(-1)
            if label.shape != cand.shape:
                raise DataError(
                    path, None, f"{where}: {label.size} labels for {cand.size} candidates"
                )
            kind = label.dtype.kind
            if kind not in "iub" or (
                label.size and (label.max() > 1 or (kind == "i" and label.min() < 0))
            ):
                raise DataError(
                    path, None, f"{where}: labels {label.tolist()}: expected 0 or 1 per candidate"
                )
            label = label.astype(np.uint8, copy=False)
        else:
            label = np.zeros(cand.shape, dtype=np.uint8)
        yield key, hist, cand, label, user


def eval_impressions(
    prepared_dir: str | Path, split: str, *, shard_indices: list[int] | None = None
) -> Iterator[Sample]:
    """Every impression of a split with all its candidates, for the evaluator.

    Order: shards in ``shard_indices`` order (default all), impressions in shard order; the
    impression id is the source file's string. ``labels`` are the 0/1 labels as float32, zeros
    for an unlabeled split; ``click_pos`` = -1. Each shard is checked against the manifest as
    it is read (see the section comment above).
    """
    manifest = load_manifest(prepared_dir)
    found = shards(prepared_dir, manifest, split)
    labeled = is_labeled(manifest, split, prepared_dir)
    n_news, n_users = int(manifest["news"]["count"]), num_users(manifest)
    for i in range(len(found)) if shard_indices is None else shard_indices:
        for imp, hist, cand, label, user in _impressions(found[i], labeled, n_news, n_users):
            yield Sample(imp, hist, cand, label.astype(np.float32), user=user)


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
        for imp, hist, cand, label, user in _impressions(shard, True, spec.n_news, spec.n_users):
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
