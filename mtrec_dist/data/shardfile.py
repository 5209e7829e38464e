"""The shard file: writer and reader of a split's impressions in one module
(docs/design.md §2.2 Shard sample).

A shard is a plain uncompressed tar (``shards/<split>-NNNNNN.tar``, written with
``webdataset.TarWriter``, ``mtime=0``: same input, same bytes). Impressions are packed
:data:`GROUP_SIZE` at a time into one tar member per group, ``<group>.`` + :data:`GROUP_MEMBER`
(``000000.imps.bin``, ``000001.imps.bin``, ...; the last group of a shard may be shorter). So
``webdataset.WebDataset(shard)`` yields one sample per group, ``tarfile`` lists one member per
group, and :func:`decode_group` turns the member's bytes into the impressions. Why groups: a tar
member costs a 512-byte header and pads its data to 512 bytes, so four ``.npy`` members per
impression (the previous layout) took 4,096 bytes per impression on synthetic MIND-large; one
member per 256 impressions costs ~3 bytes each, and the shards take ~220 bytes per impression.

Group layout (little-endian, no pickles, decoded with ``np.frombuffer``)::

    offset 0   b"MTRG"           magic
           4   uint32 version    LAYOUT_VERSION (1)
           8   uint32 n          impressions in the group
          12   uint32 flags      bit 0: labeled (the labels array is present)
          16   uint32 n_hist     history rows of all n impressions
          20   uint32 n_cand     candidate rows of all n impressions
          24   uint32 n_id       bytes of the impression-id text
          28   uint32 0          reserved
          32   int32  hist_len[n]   history length of each impression
               int32  sizes[n]      candidates of each impression
               int32  user[n]       user index (vocab/users.json; 0 = unknown)
               int32  hist[n_hist]  news rows, impression after impression, most recent last
               int32  cand[n_cand]  news rows (0 = a candidate missing from the news table)
               uint8  labels[n_cand] 0/1 per candidate (labeled groups only)
               utf-8  ids[n_id]     impression ids exactly as the source spells them, "\\n"-joined

The member is exactly that long; anything else is a corrupt group.

The reader (:func:`iter_shard`; :func:`read_groups` for whole groups, :func:`read_impressions`
one impression at a time) uses the standard library's ``tarfile`` in stream mode (what
webdataset's own reader runs on) and adds what ``tarfile`` does not check: the end-of-archive
marker must follow the last member (``tarfile`` takes a file cut between members, or a corrupt
header, for the end of the archive: silent loss), every group must decode, every row and
label must be in range, and at the end of the shard the impression count and the sha256 of
the file (hashed while it is read) must match the manifest entry.
Errors are :class:`DataError` naming the shard and, where one is to blame, the impression
(``impression #i (id '…')``, ``i`` counted from the start of the shard).
"""

from __future__ import annotations

import hashlib
import os
import struct
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mtrec_dist.data.impressions import Impressions
from mtrec_dist.data.prepared import SHARD_DIR, Shard, check_impression_id, shard_pattern
from mtrec_dist.data.tables import DataError
from mtrec_dist.utils import sha256_file

GROUP_MEMBER = "imps.bin"  # the one member name of a group: "<group>.imps.bin"
GROUP_SIZE = 256  # impressions per group (~60 KiB of MIND-like impressions)
LAYOUT_VERSION = 1
MAGIC = b"MTRG"
_HEADER = struct.Struct("<4s7I")  # magic, version, n, flags, n_hist, n_cand, n_id, reserved
_LABELED = 1
_I4 = np.dtype("<i4")
# Field names used in error messages (and the layout above).
HIST, CAND, USER = "hist", "cand", "user"
_READ_BLOCK = 1 << 20


# --------------------------------------------------------------------------- one group


def encode_group(
    ids: Sequence[str],
    hist_len: Sequence[int],
    sizes: Sequence[int],
    user: Sequence[int],
    hist: Sequence[int],
    cand: Sequence[int],
    labels: Sequence[int] | None,
) -> bytes:
    """The member bytes of one group (flat per-group sequences, in the layout above)."""
    text = "\n".join(ids).encode("utf-8")
    n, n_hist, n_cand = len(ids), len(hist), len(cand)
    if not len(hist_len) == len(sizes) == len(user) == n:
        raise ValueError("expected one history length, candidate count and user per id")
    if labels is not None and len(labels) != n_cand:
        raise ValueError("expected one label per candidate")
    flags = _LABELED if labels is not None else 0
    parts = [
        _HEADER.pack(MAGIC, LAYOUT_VERSION, n, flags, n_hist, n_cand, len(text), 0),
        np.asarray(hist_len, dtype=_I4).tobytes(),
        np.asarray(sizes, dtype=_I4).tobytes(),
        np.asarray(user, dtype=_I4).tobytes(),
        np.asarray(hist, dtype=_I4).tobytes(),
        np.asarray(cand, dtype=_I4).tobytes(),
    ]
    if labels is not None:
        parts.append(np.asarray(labels, dtype=np.uint8).tobytes())
    parts.append(text)
    return b"".join(parts)


def decode_group(data: bytes) -> Impressions:
    """A group from its member bytes; ValueError saying what is wrong with a corrupt one.

    The columns are the layout's own (docs/design.md §2.2): ``hist``, ``cand``, ``hist_len``,
    ``sizes`` and ``user`` int32 views of ``data``, ``labels`` uint8 or None in an unlabeled
    group; :func:`read_groups` gives the checked, widened form every reader uses.

    Only the structure is checked here (magic, version, sizes, lengths that add up, one id per
    impression); the values (rows, labels, users) are checked by :func:`read_impressions`.
    """
    if len(data) < _HEADER.size:
        raise ValueError(f"{len(data)} bytes, shorter than the {_HEADER.size}-byte group header")
    magic, version, n, flags, n_hist, n_cand, n_id, _ = _HEADER.unpack_from(data)
    if magic != MAGIC or version != LAYOUT_VERSION:
        raise ValueError(
            f"header {magic!r} version {version}: expected {MAGIC!r} version {LAYOUT_VERSION}"
        )
    labeled = bool(flags & _LABELED)
    want = _HEADER.size + 4 * (3 * n + n_hist + n_cand) + (n_cand if labeled else 0) + n_id
    if len(data) != want:
        raise ValueError(
            f"{len(data)} bytes, expected {want} for {n} impressions, {n_hist} history rows, "
            f"{n_cand} candidates"
        )
    ints = np.frombuffer(data, dtype=_I4, count=3 * n + n_hist + n_cand, offset=_HEADER.size)
    hist_len, sizes, user = ints[:n], ints[n : 2 * n], ints[2 * n : 3 * n]
    hist, cand = ints[3 * n : 3 * n + n_hist], ints[3 * n + n_hist :]
    end = _HEADER.size + 4 * ints.size
    labels = None
    if labeled:
        labels = np.frombuffer(data, dtype=np.uint8, count=n_cand, offset=end)
        end += n_cand
    if n and (
        min(hist_len.min(), sizes.min()) < 0
        or int(hist_len.sum()) != n_hist
        or int(sizes.sum()) != n_cand
    ):
        raise ValueError(f"lengths do not add up to {n_hist} history rows and {n_cand} candidates")
    ids = data[end:].decode("utf-8").split("\n") if n else []
    if len(ids) != n:
        raise ValueError(f"{len(ids)} impression ids for {n} impressions")
    return Impressions(
        ids=np.asarray(ids, dtype=str), hist=hist, hist_len=hist_len, cand=cand, sizes=sizes,
        labels=labels, user=user, click_pos=np.full(n, -1, dtype=np.int64),
    )  # fmt: skip


# --------------------------------------------------------------------------- writer


class ShardWriter:
    """Writes one split's impressions into ``shards/<split>-NNNNNN.tar`` under ``root``.

    ``impressions_per_shard`` impressions per shard, packed ``group_size`` per tar member;
    shard files are numbered from ``start_shard``.
    :meth:`close` returns the manifest's shard entries (path relative to ``root``, sha256,
    impressions, clicks). The first impression decides whether the split is labeled; a later
    impression that differs is a ValueError (prepare checks it first, naming the line).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        impressions_per_shard: int,
        group_size: int = GROUP_SIZE,
        start_shard: int = 0,
    ):
        if impressions_per_shard < 1 or group_size < 1:
            raise ValueError("impressions_per_shard and group_size must be >= 1")
        self.root, self.split = Path(root), split
        self.per_shard, self.group_size = impressions_per_shard, group_size
        self.start_shard = start_shard  # number of the first shard file
        self.labeled: bool | None = None
        self.entries: list[dict] = []
        self._tar = None
        self._shard_imps = self._shard_clicks = self._groups = 0
        self._reset_group()
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    def _reset_group(self) -> None:
        self._ids: list[str] = []
        self._hist_len: list[int] = []
        self._sizes: list[int] = []
        self._user: list[int] = []
        self._hist: list[int] = []
        self._cand: list[int] = []
        self._labels: list[int] = []

    def write(
        self,
        imp_id: str,
        hist: Sequence[int],
        cand: Sequence[int],
        labels: Sequence[int] | None,
        user: int,
    ) -> None:
        """Add one impression (news rows, 0/1 labels or None, user index)."""
        if self.labeled is None:
            self.labeled = labels is not None
        elif self.labeled != (labels is not None):
            raise ValueError(
                f"impression {imp_id}: expected {'labels' if self.labeled else 'no labels'} "
                "like the split's first impression"
            )
        if labels is not None and len(labels) != len(cand):
            raise ValueError(f"impression {imp_id}: expected one label per candidate")
        if self._tar is None:
            path = self.root / (shard_pattern(self.split) % (self.start_shard + len(self.entries)))
            import webdataset as wds  # lazy: only writers need it (~1 s); readers never do

            self._tar = wds.TarWriter(str(path), encoder=False, mtime=0)
            self._path = path
        self._ids.append(imp_id)
        self._hist_len.append(len(hist))
        self._sizes.append(len(cand))
        self._user.append(int(user))
        self._hist.extend(hist)
        self._cand.extend(cand)
        if labels is not None:
            self._labels.extend(labels)
            self._shard_clicks += int(sum(labels))
        self._shard_imps += 1
        if len(self._ids) == self.group_size:
            self._flush_group()
        if self._shard_imps == self.per_shard:
            self._close_shard()

    def _flush_group(self) -> None:
        if not self._ids:
            return
        data = encode_group(
            self._ids, self._hist_len, self._sizes, self._user, self._hist, self._cand,
            self._labels if self.labeled else None,
        )  # fmt: skip
        self._tar.write({"__key__": f"{self._groups:06d}", GROUP_MEMBER: data})
        self._groups += 1
        self._reset_group()

    def _close_shard(self) -> None:
        self._flush_group()
        self._tar.close()
        self.entries.append(
            {
                "path": self._path.relative_to(self.root).as_posix(),
                "sha256": sha256_file(self._path),
                "impressions": self._shard_imps,
                "clicks": self._shard_clicks,
            }
        )
        self._tar = None
        self._shard_imps = self._shard_clicks = self._groups = 0

    def close(self) -> list[dict]:
        """Finish the last shard; the manifest entries of every shard written."""
        if self._tar is not None:
            self._close_shard()
        return self.entries

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- reader


class _HashingReader:
    """A binary file read front to back, every byte read also fed to sha256: one pass gives
    the parse and the hash."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        return b

    def finish(self) -> str:
        while self.read(_READ_BLOCK):
            pass
        return self.sha.hexdigest()


def _group_at(first: int, name: str) -> str:
    return f"member {name!r} (impressions from #{first})"


def iter_shard(path: str | Path, expect: Shard | None = None) -> Iterator[Impressions]:
    """The groups of one shard in tar order, with the tar structure checked.

    Members other than ``*.imps.bin`` are skipped unread. The end-of-archive marker must follow
    the last member. With ``expect`` (the shard's manifest entry) the impression count and the
    sha256 are checked once the file is read to its end, so a consumer sees every group of an
    altered shard before the error.
    """
    path = Path(path)
    n, last = 0, "the start of the file"
    with open(path, "rb", buffering=_READ_BLOCK) as f:
        src = _HashingReader(f)
        try:
            tf = tarfile.open(fileobj=src, mode="r|", bufsize=_READ_BLOCK)
        except tarfile.TarError as e:
            raise DataError(
                path, None, f"not an uncompressed tar shard ({e}); re-run `mtrec prepare`"
            ) from None
        for m in tf:
            tf.members = []  # stream mode keeps every TarInfo otherwise
            if not m.isreg() or not m.name.endswith("." + GROUP_MEMBER):
                continue
            try:
                data = tf.extractfile(m).read()
            except tarfile.ReadError:
                raise DataError(
                    path, None, f"truncated: the file ends inside member {m.name!r}; "
                    "re-run `mtrec prepare`",
                ) from None  # fmt: skip
            try:
                group = decode_group(data)
            except ValueError as e:
                raise DataError(
                    path, None, f"{_group_at(n, m.name)}: not an impression group ({e}); "
                    "re-run `mtrec prepare`",
                ) from None  # fmt: skip
            last = f"member {m.name!r}"
            yield group
            n += len(group)
        _check_end_marker(path, f, tf.offset, f"after {last}")
        digest = src.finish()
    if expect is not None:
        _check_whole(path, n, digest, expect)


def _check_end_marker(path: Path, f: BinaryIO, offset: int, where: str) -> None:
    """``tarfile`` stops at two zero blocks, at a file cut at a member boundary and at a corrupt
    header alike: only the end-of-archive marker is a complete shard."""
    end = os.pread(f.fileno(), 1024, offset)
    if len(end) < 1024:
        raise DataError(
            path, None, f"truncated: the file ends {where} without the tar end-of-archive "
            "marker; re-run `mtrec prepare`",
        )  # fmt: skip
    if end.count(0) != 1024:
        raise DataError(
            path, None, f"{where}: tar header checksum mismatch (or not a tar header); "
            "re-run `mtrec prepare`",
        )  # fmt: skip


def _check_whole(path: Path, n: int, digest: str, expect: Shard) -> None:
    if n != expect.impressions:
        raise DataError(
            path,
            None,
            f"holds {n} impressions but the manifest says {expect.impressions} (truncated or "
            "altered); re-run `mtrec prepare`",
        )
    if digest != expect.sha256:
        raise DataError(
            path,
            None,
            f"sha256 {digest} differs from the manifest's {expect.sha256}: the shard was "
            "altered after `mtrec prepare`; re-run it",
        )


def _at(first: int, g: Impressions, i: int) -> str:
    """How errors name an impression: its position in the shard and its id."""
    return f"impression #{first + i} (id {str(g.ids[i])!r})"


def _owner(lengths: np.ndarray, pos: int) -> int:
    """The impression whose slice of a flat array holds element ``pos``."""
    return int(np.searchsorted(np.cumsum(lengths), pos, side="right"))


def _check_rows(
    path: Path, first: int, g: Impressions, name: str, lo: int, n_news: int
) -> np.ndarray:
    """The group's ``hist`` or ``cand`` rows as int64, each in ``[lo, n_news)``."""
    a, lengths = (g.hist, g.hist_len) if name == HIST else (g.cand, g.sizes)
    # One unsigned reduction checks both ends.
    if a.size and (a.view(np.uint32) - np.uint32(lo)).max() >= n_news - lo:
        pos = int(np.flatnonzero((a < lo) | (a >= n_news))[0])
        raise DataError(
            path, None, f"{_at(first, g, _owner(lengths, pos))}: {name} holds news row "
            f"{int(a[pos])}, expected {lo} <= row < {n_news} (the news table's rows); "
            "re-run `mtrec prepare`",
        )  # fmt: skip
    return a.astype(np.int64)


def _check_group(
    path: Path, first: int, g: Impressions, labeled: bool, n_users: int | None
) -> None:
    """Ids, labels and users of one group against the manifest."""
    for i, key in enumerate(g.ids.tolist()):
        why = check_impression_id(key)
        if why is not None:
            raise DataError(path, None, f"{_at(first, g, i)}: impression id {why}")
    if labeled and g.labels is None:
        raise DataError(
            path, None, f"{_at(first, g, 0)}: no labels, but the manifest says the split is "
            "labeled; re-run `mtrec prepare`",
        )  # fmt: skip
    if labeled and g.labels.size and g.labels.max() > 1:
        i = _owner(g.sizes, int(np.flatnonzero(g.labels > 1)[0]))
        a = int(g.sizes[:i].sum())
        raise DataError(
            path, None, f"{_at(first, g, i)}: labels {g.labels[a : a + g.sizes[i]].tolist()}: "
            "expected 0 or 1 per candidate",
        )  # fmt: skip
    if n_users is not None and len(g) and (g.user.view(np.uint32).max() >= n_users):
        i = int(np.flatnonzero((g.user < 0) | (g.user >= n_users))[0])
        raise DataError(
            path, None, f"{_at(first, g, i)}: {USER} {int(g.user[i])}, expected a user index "
            f"in [0, {n_users}) (news.vocab.users); re-run `mtrec prepare`",
        )  # fmt: skip


def read_groups(
    shard: Shard, labeled: bool, n_news: int, n_users: int | None = None
) -> Iterator[Impressions]:
    """The groups of a shard with every value checked, as the readers use them.

    Checked: history rows in [1, n_news) (prepare drops history news missing from the table),
    candidate rows in [0, n_news) (0 = missing news), labels 0 or 1, the user index in
    [0, n_users), then count and sha256 (:func:`iter_shard`). The columns come in the dtypes
    of :mod:`mtrec_dist.data.impressions` (``labels`` zeros for an unlabeled split);
    ``n_users=None`` (a manifest without a user vocabulary): every impression is user 0.
    """
    path, first = shard.path, 0
    for g in iter_shard(path, shard):
        _check_group(path, first, g, labeled, n_users)
        hist = _check_rows(path, first, g, HIST, 1, n_news)
        cand = _check_rows(path, first, g, CAND, 0, n_news)
        labels = g.labels.astype(np.float32) if labeled else np.zeros(cand.size, np.float32)
        user = g.user.astype(np.int64) if n_users is not None else np.zeros(len(g), np.int64)
        yield Impressions(
            ids=g.ids, hist=hist, hist_len=g.hist_len.astype(np.int64), cand=cand,
            sizes=g.sizes.astype(np.int64), labels=labels, user=user, click_pos=g.click_pos,
        )  # fmt: skip
        first += len(g)


def read_impressions(
    shard: Shard, labeled: bool, n_news: int, n_users: int | None = None
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, int]]:
    """(impression id, hist int64, cand int64, labels float32, user) per impression of a shard:
    the groups of :func:`read_groups` (every check of it) cut into rows, for tools that count
    or compare impressions one at a time."""
    for g in read_groups(shard, labeled, n_news, n_users):
        for s in g.samples():
            yield s.impression_id, s.hist, s.cand, s.labels, s.user
