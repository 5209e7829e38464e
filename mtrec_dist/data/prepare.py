"""``mtrec prepare``: source files -> news table + WebDataset shards + manifest.json.

Why a prepare step: readers parse text/parquet once; training workers then only memory-map
integer arrays and stream integer-only shards (never pickles), so N workers on M machines do
no parsing and no tokenization. The folder layout is documented in ``mtrec_dist.data.batch``;
the manifest and its reader are in ``mtrec_dist.data.prepared`` (format_version 2); the shard
file (impressions packed in groups, one tar member each) is written and read by
``mtrec_dist.data.shardfile``.

Refused here, with the file and line: a repeated impression id anywhere in a split (ids are
strings, carried unchanged into the shards), an id a shard cannot hold, a split mixing labeled
and unlabeled impressions, a split without impressions.

Crash safety: everything is written into a temporary sibling folder which is renamed into
place only after manifest.json (written last) is complete, so a folder that has a manifest is
always finished, and an existing prepared folder is replaced only by a complete one.

Users: a first pass over the train split's behaviors builds the user vocabulary (train users
1..n in sorted id order, 0 = unknown; see ``mtrec_dist.data.prepared``) before any shard is
written, so every split's shards store the same index for a user.

Memory: the news table (about 161k rows for MIND-large) is held in memory; impressions are
streamed from the reader straight into shards, one at a time.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mtrec_dist import utils
from mtrec_dist.config import Config, ConfigError
from mtrec_dist.data import ebnerd, mind
from mtrec_dist.data.batch import PAD_NEWS_ID
from mtrec_dist.data.prepared import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_DIR,
    USER_VOCAB,
    check_impression_id,
    vocab_path,
)
from mtrec_dist.data.shardfile import ShardWriter
from mtrec_dist.data.tables import DataError, Entity, Impression, News, ReadStats
from mtrec_dist.data.tokenize import title_entity_order, tokenize_titles
from mtrec_dist.data.vectors import write_entity_vectors
from mtrec_dist.hub import load_tokenizer, tokenizer_fingerprint
from mtrec_dist.utils import Progress, atomic_swap_dir, atomic_write_json, peak_rss_mb, pid_alive

OPTIONAL_SPLITS = ("test",)
SPLIT_STATS = (
    "empty_history",
    "history_missing_news",
    "candidates_missing_news",
    "history_truncated",
    "impressions_without_click",
    "unknown_user",  # user id not in the train split's users: stored as user 0
)
TRAIN_SPLIT = "train"  # the split whose behaviors define the user vocabulary


# --------------------------------------------------------------------------------------------
# Source formats: the only place that knows where each format keeps its files.


@dataclasses.dataclass
class _Source:
    split_dir: Callable[[Path, str], Path]
    news: Callable[[list[tuple[str, Path]], ReadStats], Iterator[News]]
    behaviors: Callable[[Path, ReadStats], Iterator[Impression]]
    count: Callable[[Path], int | None]
    behaviors_file: Callable[[Path], Path]  # what errors about a split's impressions name


def _count_lines(path: Path) -> int | None:
    """Newlines in ``path`` (fast, for the ETA only); None if it cannot be read."""
    try:
        n = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                n += block.count(b"\n")
        return n
    except OSError:
        return None


def _mind_source(root: Path) -> _Source:
    def news(folders: list[tuple[str, Path]], stats: ReadStats) -> Iterator[News]:
        for _, folder in folders:
            yield from mind.read_news(folder / "news.tsv", stats)

    return _Source(
        split_dir=mind.split_dir,
        news=news,
        behaviors=lambda folder, stats: mind.iter_behaviors(folder / "behaviors.tsv", stats),
        count=lambda folder: _count_lines(folder / "behaviors.tsv"),
        behaviors_file=lambda folder: folder / "behaviors.tsv",
    )


def _ebnerd_source(root: Path) -> _Source:
    def news(folders: list[tuple[str, Path]], stats: ReadStats) -> Iterator[News]:
        yield from ebnerd.read_articles(ebnerd.articles_path(root), stats)

    def count(folder: Path) -> int | None:
        try:
            return int(pq.ParquetFile(folder / "behaviors.parquet").metadata.num_rows)
        except Exception:  # the count only feeds the ETA
            return None

    return _Source(
        split_dir=ebnerd.split_dir,
        news=news,
        behaviors=lambda folder, stats: ebnerd.iter_behaviors(folder, stats),
        count=count,
        behaviors_file=lambda folder: folder / "behaviors.parquet",
    )


def _source(fmt: str, root: Path) -> _Source:
    if fmt == "mind":
        return _mind_source(root)
    if fmt == "ebnerd":
        return _ebnerd_source(root)
    raise ConfigError(f"data.format={fmt!r}: allowed values are mind, ebnerd")


def _split_folders(src: _Source, root: Path, splits: list[str], say) -> list[tuple[str, Path]]:
    """Existing split folders in config order; a missing ``test`` is skipped with a notice."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r}: no such folder")
    out: list[tuple[str, Path]] = []
    for split in splits:
        try:
            folder = src.split_dir(root, split)
        except FileNotFoundError as e:
            if split in OPTIONAL_SPLITS:
                say(f"notice: skipping split {split!r}: {e}")
                continue
            raise FileNotFoundError(f"data.splits includes {split!r} but {e}") from None
        out.append((split, Path(folder)))
    if not out:
        raise FileNotFoundError(f"data.root={str(root)!r}: none of data.splits={splits} found")
    return out


# --------------------------------------------------------------------------------------------
# News table


def _vocab(names: set[str]) -> list[str]:
    return ["<unk>"] + sorted(n for n in names if n)


def _entity_table(
    titles: list[str], ents: list[list[Entity]], max_entities: int
) -> tuple[list[dict], np.ndarray]:
    """Entity vocabulary over all title entities (sorted by WikidataId; surface and type from
    the first news that mentions one) and each title's first ``max_entities`` entity ids in
    title order."""
    n = len(titles)
    first: dict[str, Entity] = {}
    for el in ents:
        for e in el:
            if e.wikidata_id and e.wikidata_id not in first:
                first[e.wikidata_id] = e
    ent_vocab: list[dict] = [{"id": "<none>"}]
    for wid in sorted(first):
        e = first[wid]
        surface = e.surface_forms[0] if e.surface_forms else e.label
        ent_vocab.append({"id": wid, "surface": surface, "type": e.type})
    ent_ix = {d["id"]: i for i, d in enumerate(ent_vocab) if i > 0}
    entities = np.zeros((n, max_entities), dtype=np.int32)
    if max_entities > 0:
        for row, (title, el) in enumerate(zip(titles, ents)):
            if not el:
                continue
            picked: list[int] = []
            for k in title_entity_order(title, el):
                ix = ent_ix.get(el[k].wikidata_id)
                if ix is not None and ix not in picked:
                    picked.append(ix)
            picked = picked[:max_entities]
            entities[row, : len(picked)] = picked

    return ent_vocab, entities


def build_news_table(
    news: Iterator[News], tokenizer, title_len: int, max_entities: int, batch_size: int = 4096
) -> tuple[dict[str, np.ndarray], list[str], dict[str, list], dict]:
    """Deduplicate news (first occurrence wins) and build the table arrays and vocabularies.

    Returns ``(arrays, news_ids, vocabs, info)``; row 0 is the padding news ``<pad>`` with an
    empty title. ``info`` holds the ``news`` part of the manifest.
    """
    ids = [PAD_NEWS_ID]
    seen: set[str] = {PAD_NEWS_ID}
    titles, ents = [""], [[]]
    cats, subs, sents = [""], [""], [-1]
    duplicates = 0
    for r in news:
        if r.news_id in seen:
            if r.news_id == PAD_NEWS_ID:
                raise DataError(PAD_NEWS_ID, None, f"news id {PAD_NEWS_ID!r} is reserved")
            duplicates += 1
            continue
        seen.add(r.news_id)
        ids.append(r.news_id)
        titles.append(r.title)
        ents.append(r.title_entities)
        cats.append(r.category)
        subs.append(r.subcategory)
        sents.append(int(r.sentiment))
    del seen
    n = len(ids)

    cat_vocab, sub_vocab = _vocab(set(cats)), _vocab(set(subs))
    for name, voc in (("category", cat_vocab), ("subcategory", sub_vocab)):
        if len(voc) > np.iinfo(np.int16).max:
            raise DataError(name, None, f"{len(voc)} distinct values do not fit int16")
    cat_ix = {c: i for i, c in enumerate(cat_vocab)}
    sub_ix = {c: i for i, c in enumerate(sub_vocab)}
    cat_ix[""] = sub_ix[""] = 0
    category = np.array([cat_ix[c] for c in cats], dtype=np.int16)
    subcategory = np.array([sub_ix[c] for c in subs], dtype=np.int16)
    sentiment = np.array(sents, dtype=np.int8)

    ent_vocab, entities = _entity_table(titles, ents, max_entities)

    tokens, ner, ner_stats = tokenize_titles(titles, ents, tokenizer, title_len, batch_size)
    arrays = {
        "tokens": tokens,
        "ner": ner,
        "category": category,
        "subcategory": subcategory,
        "sentiment": sentiment,
        "entities": entities,
    }
    vocabs = {"category": cat_vocab, "subcategory": sub_vocab, "entities": ent_vocab}
    info = {
        "count": n,
        "has_sentiment": bool((sentiment >= 0).any()),
        "duplicates_skipped": duplicates,
        "vocab": {k: len(v) for k, v in vocabs.items()},
        "ner": ner_stats,
    }
    return arrays, ids, vocabs, info


# --------------------------------------------------------------------------------------------
# Shards


def user_vocab(user_ids: Iterator[str]) -> list[str]:
    """``["<unk>"]`` then the distinct user ids in sorted order: train users get 1..n."""
    return ["<unk>"] + sorted(set(user_ids))


def _shard_rows(
    imp: Impression,
    row_of: dict[str, int],
    history_len: int,
    st: dict[str, int],
    user_of: dict[str, int],
) -> tuple[list[int], list[int], list[int] | None, int]:
    """(history rows, candidate rows, labels or None, user index) of one impression, counted
    into the split's stats."""
    get = row_of.get
    rows = [get(h) for h in imp.history]
    hist = [r for r in rows if r is not None]
    st["history_missing_news"] += len(rows) - len(hist)
    if len(hist) > history_len:
        st["history_truncated"] += 1
        hist = hist[-history_len:]
    if not hist:
        st["empty_history"] += 1
    cand = [get(c, 0) for c in imp.candidates]
    st["candidates_missing_news"] += sum(1 for c in imp.candidates if c not in row_of)
    user = user_of.get(str(imp.user_id), 0)
    if user == 0:
        st["unknown_user"] += 1
    labels = None
    if imp.labels is not None:
        labels = [int(x) for x in imp.labels]
        if len(labels) != len(cand):
            raise ValueError("expected one label per candidate")
        if not any(labels):
            st["impressions_without_click"] += 1
    return hist, cand, labels, user


class _IdCheck:
    """Impression ids of one split: each a valid sample key, none repeated anywhere in the split
    (every id is kept with its line: about 100 bytes per impression)."""

    def __init__(self, source: str):
        self.source, self.lines = source, {}
        self.labeled: bool | None = None

    def __call__(self, imp: Impression, n: int) -> str:
        """The checked key of the ``n``-th impression (0-based; its line when the reader has none)."""
        key, line = str(imp.impression_id), imp.line if imp.line is not None else n + 1
        why = check_impression_id(key)
        if why is not None:
            raise DataError(self.source, line, f"impression id {key!r} {why}")
        first = self.lines.setdefault(key, line)
        if first != line:
            raise DataError(
                self.source,
                line,
                f"impression id {key!r} repeats the id of line {first}: expected unique ids",
            )
        has_labels = imp.labels is not None
        if self.labeled is None:
            self.labeled = has_labels
        elif self.labeled != has_labels:
            raise DataError(
                self.source,
                line,
                f"impression {key}: expected {'labels' if self.labeled else 'no labels'} "
                "like the split's first impression",
            )
        return key


def write_split(
    split: str,
    impressions: Iterator[Impression],
    row_of: dict[str, int],
    out_dir: Path,
    history_len: int,
    impressions_per_shard: int,
    total: int | None = None,
    progress: bool = True,
    source: str = "",
    user_of: dict[str, int] | None = None,
) -> dict:
    """Stream one split's impressions into ``out_dir/shards/<split>-NNNNNN.tar``.

    ``user_of``: user id -> index in the user vocabulary (absent = 0, the unknown user).
    Returns the split's manifest entry (shard paths are relative to ``out_dir``).
    """
    user_of = user_of or {}
    st = dict.fromkeys(SPLIT_STATS, 0)
    n_imp = n_cand = n_click = 0
    check = _IdCheck(source or split)
    cpu0 = time.process_time()
    prog = Progress(f"prepare {split}", total, unit="impressions")
    prog.enabled = prog.enabled and progress
    writer = ShardWriter(out_dir, split, impressions_per_shard)
    try:
        for imp in impressions:
            key = check(imp, n_imp)
            try:
                hist, cand, labels, user = _shard_rows(imp, row_of, history_len, st, user_of)
            except ValueError as e:
                raise DataError(check.source, imp.line, f"impression {key}: {e}") from None
            writer.write(key, hist, cand, labels, user)
            n_imp += 1
            n_cand += len(cand)
            n_click += sum(labels) if labels else 0
            prog.update()
    finally:
        shards = writer.close()
    if n_imp == 0:
        raise DataError(check.source, None, f"split {split!r} has no impressions")
    seconds = prog.close(f"-> {len(shards)} shards")
    return {
        "labeled": bool(check.labeled),
        "impressions": n_imp,
        "candidates": n_cand,
        "clicks": n_click,
        "impressions_per_shard": impressions_per_shard,
        "impressions_per_group": writer.group_size,
        "shards": shards,
        "stats": st,
        "seconds": round(seconds, 2),  # wall time of this split (informational)
        "cpu_seconds": round(time.process_time() - cpu0, 2),
    }


# --------------------------------------------------------------------------------------------
# prepare


def _clean_stale(out: Path) -> None:
    """Remove temporary folders left by prepares that were killed (their pid is gone)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


# Splits run in forked worker processes (one split per process): tar writing is pure Python and
# single-threaded, so two processes halve MIND-large's wall time on 2 cores. The workers inherit
# the id -> row mapping through fork (copy-on-write), nothing large is pickled.
_FORK_STATE: dict = {}


def _split_job(split: str, folder: Path, tmp: Path, total: int | None, progress: bool) -> tuple:
    """Run one split in a worker; errors come back as plain data (type name and message)."""
    st = _FORK_STATE
    try:
        rstats = ReadStats()
        entry = write_split(
            split,
            st["src"].behaviors(folder, rstats),
            st["row_of"],
            tmp,
            st["history_len"],
            st["impressions_per_shard"],
            total=total,
            progress=progress,
            source=str(st["src"].behaviors_file(folder)),
            user_of=st["user_of"],
        )
        entry["read_stats"] = rstats.as_dict()
        return ("ok", entry)
    except BaseException as e:  # noqa: BLE001 - re-raised in the parent
        if isinstance(e, DataError):
            return ("data_error", str(e), str(e.path), e.line)
        return ("error", type(e).__name__, str(e))


def _unwrap(result: tuple) -> dict:
    kind = result[0]
    if kind == "ok":
        return result[1]
    if kind == "data_error":
        err = DataError.__new__(DataError)
        ValueError.__init__(err, result[1])
        err.path, err.line = result[2], result[3]
        raise err
    # Rebuild a builtin exception type by name (OSError, ValueError, ...); others keep the name.
    cls = getattr(builtins, result[1], None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        raise cls(result[2])
    raise RuntimeError(f"{result[1]}: {result[2]}")


def _run_splits(
    folders: list[tuple[str, Path]], tmp: Path, workers: int, progress: bool
) -> dict[str, dict]:
    """Write every split's shards; returns manifest entries in ``folders`` order."""
    totals = {split: _FORK_STATE["src"].count(folder) for split, folder in folders}
    if workers <= 1 or len(folders) <= 1 or "fork" not in mp.get_all_start_methods():
        return {
            split: _unwrap(_split_job(split, folder, tmp, totals[split], progress))
            for split, folder in folders
        }
    # Largest split first: the pool hands out jobs in submission order, so this balances the
    # workers (MIND-large: test 2.37M || train 2.23M + dev 0.38M impressions).
    order = sorted(folders, key=lambda sf: -(totals[sf[0]] or 0))
    # The parent is done with the tokenizer; silence the Rust tokenizer's fork warning.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(workers, len(folders)), mp_context=ctx) as pool:
        futures = {
            split: pool.submit(_split_job, split, folder, tmp, totals[split], progress)
            for split, folder in order
        }
        return {split: _unwrap(futures[split].result()) for split, _ in folders}


def prepare(cfg: Config, progress: bool = True, workers: int | None = None) -> dict:
    """Prepare ``cfg.data.root`` into ``cfg.prepared_dir``; returns the manifest.

    ``workers``: processes writing shards, one split each (default: 2, or fewer where there are
    fewer splits or CPU cores). The output is byte-identical for any number of workers.
    """

    say = partial(utils.say, enabled=progress)  # prepare's own switch

    t0, cpu0 = time.monotonic(), time.process_time()
    d = cfg.data
    root = Path(d.root)
    out = cfg.prepared_dir
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise FileExistsError(
            f"data.prepared={str(out)!r} exists, is not empty and has no manifest.json: "
            "refusing to replace a folder that is not a prepared dataset"
        )
    src = _source(d.format, root)
    folders = _split_folders(src, root, list(d.splits), say)
    tok = load_tokenizer(cfg.model.encoder)
    fingerprint = tokenizer_fingerprint(tok)

    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "news").mkdir(parents=True)
    (tmp / "vocab").mkdir()
    try:
        say(f"prepare: reading news of {[s for s, _ in folders]} from {root}")
        news_info, row_of = _write_news(cfg, src, folders, tok, tmp)
        news_info["seconds"] = round(time.monotonic() - t0, 2)  # informational
        news_info["cpu_seconds"] = round(time.process_time() - cpu0, 2)
        say(f"prepare: news table {news_info['count']} rows (incl. <pad>), NER {news_info['ner']}")
        ev = news_info["entity_vectors"]
        say(
            f"prepare: entity vectors: {ev['with_vector']} entities with, "
            f"{ev['without_vector']} without"
        )

        user_of = _write_users(src, folders, tmp, news_info, say)
        if workers is None:
            workers = min(2, os.cpu_count() or 1)
        _FORK_STATE.update(
            src=src,
            row_of=row_of,
            user_of=user_of,
            history_len=d.history_len,
            impressions_per_shard=d.impressions_per_shard,
        )
        try:
            splits = _run_splits(folders, tmp, workers, progress)
        finally:
            _FORK_STATE.clear()
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"root": str(root), "format": d.format},
            "tokenizer": {"encoder": cfg.model.encoder, **fingerprint},
            "title_len": d.title_len,
            "history_len": d.history_len,
            "max_entities": d.max_entities,
            "news": news_info,
            "splits": splits,
            "config": dataclasses.asdict(d),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        atomic_swap_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    el = time.monotonic() - t0
    say(f"prepare: wrote {out} in {el:.1f}s (peak RSS {peak_rss_mb():.0f} MiB)")
    say(f"  news: {news_info['count']} rows -> {out / 'news'}, vocab sizes {news_info['vocab']}")
    for split, e in splits.items():
        say(
            f"  {split}: {e['impressions']} impressions, {e['clicks']} clicks, "
            f"{len(e['shards'])} shards -> {out / SHARD_DIR}/{split}-*.tar; stats {e['stats']}"
        )
    return manifest


def _write_news(
    cfg: Config, src: _Source, folders: list[tuple[str, Path]], tok, tmp: Path
) -> tuple[dict, dict[str, int]]:
    """Build the news table into ``tmp``; returns the manifest's ``news`` part and the
    news id -> row mapping the shards are written with."""
    d = cfg.data
    news_stats = ReadStats()
    arrays, ids, vocabs, news_info = build_news_table(
        src.news(folders, news_stats), tok, d.title_len, d.max_entities, d.tokenize_batch
    )
    news_info["read_stats"] = news_stats.as_dict()
    for name, arr in arrays.items():
        np.save(tmp / "news" / f"{name}.npy", arr, allow_pickle=False)
    (tmp / "news" / "news_ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    for name, voc in vocabs.items():
        vocab_path(tmp, name).write_text(
            json.dumps(voc, ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
        )
    root = Path(d.root)
    news_info["entity_vectors"] = write_entity_vectors(
        root, [f for _, f in folders], vocabs["entities"], tmp / "vocab"
    )
    return news_info, {nid: i for i, nid in enumerate(ids) if i > 0}


def _write_users(
    src: _Source, folders: list[tuple[str, Path]], tmp: Path, news_info: dict, say
) -> dict[str, int]:
    """The user vocabulary from the train split's behaviors (a reading pass before the shards
    are written, so every split's shards get the same indices): ``vocab/users.json`` and
    ``news.vocab.users``; returns user id -> index (train users 1..n, sorted)."""
    train = [folder for split, folder in folders if split == TRAIN_SPLIT]
    ids: list[str] = []
    if train:
        say(f"prepare: reading the users of split {TRAIN_SPLIT!r}")
        ids = [str(imp.user_id) for imp in src.behaviors(train[0], ReadStats())]
    else:
        say(f"notice: no split {TRAIN_SPLIT!r}: every impression gets the unknown user (0)")
    vocab = user_vocab(iter(ids))
    vocab_path(tmp, USER_VOCAB).write_text(
        json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
    )
    news_info["vocab"][USER_VOCAB] = len(vocab)
    return {u: i for i, u in enumerate(vocab) if i > 0}
