"""Read EBNeRD (Ekstra Bladet News Recommendation Dataset) parquet files into the same records
as MIND (``tables.News`` / ``tables.Impression``), so nothing after ``prepare`` knows the source.

Layout: ``<root>/articles.parquet`` and one folder per split, ``train/``, ``validation/``,
``test/``, each with ``behaviors.parquet`` (one row per impression) and ``history.parquet`` (one
row per user: the user's clicks before the split's period). Our split names train/dev/test map to
train/validation/test.

Why batches: EBNeRD-large behaviors has ~12M impressions; behaviors are streamed in pyarrow
record batches and only the per-user history (needed for the join) is held in memory, as
news-id strings already ordered oldest first.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mtrec_dist.data.tables import SENTIMENT_LABELS, DataError, Entity, Impression, News, ReadStats

SPLIT_FOLDERS = {"train": "train", "dev": "validation", "test": "test"}
ARTICLE_REQUIRED = ("article_id", "title", "category_str")
ARTICLE_OPTIONAL = (
    "subtitle",
    "url",
    "subcategory",
    "sentiment_label",
    "ner_clusters",
    "entity_groups",
)
BEHAVIOR_REQUIRED = ("impression_id", "user_id", "impression_time", "article_ids_inview")
CLICKS = "article_ids_clicked"
HISTORY_REQUIRED = ("user_id", "impression_time_fixed", "article_id_fixed")
_BATCH_ROWS = 65536
_SENTIMENT = {s: i for i, s in enumerate(SENTIMENT_LABELS)}


def split_dir(root: str | Path, split: str) -> Path:
    """EBNeRD's folder for our split name (dev -> ``validation``)."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split: expected one of {list(SPLIT_FOLDERS)}, got {split!r}")
    folder = Path(root) / SPLIT_FOLDERS[split]
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder for split {split!r}: looked for {folder}")
    return folder


def articles_path(root: str | Path) -> Path:
    """``<root>/articles.parquet`` (FileNotFoundError naming it if absent)."""
    p = Path(root) / "articles.parquet"
    if not p.is_file():
        raise FileNotFoundError(f"no EBNeRD articles file: looked for {p}")
    return p


def _open(path: Path, required: tuple[str, ...]) -> pq.ParquetFile:
    if not path.is_file():
        raise FileNotFoundError(f"no such parquet file: {path}")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet input
        raise DataError(path, None, f"expected a parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    for col in required:
        if col not in names:
            raise DataError(path, None, f"expected column {col!r} (columns: {sorted(names)})")
    return pf


def _title_entities(
    title: str, clusters: list[Any] | None, groups: list[Any] | None
) -> list[Entity]:
    """One Entity per NER cluster: EBNeRD gives surface strings and their types, no ids/offsets.

    The offset is the first exact occurrence in the title (as MIND's OccurrenceOffsets), or [].
    """
    out: list[Entity] = []
    for i, form in enumerate(clusters or []):
        if form is None:
            continue
        typ = groups[i] if groups is not None and i < len(groups) and groups[i] is not None else ""
        pos = title.find(form) if form else -1
        out.append(Entity(form, typ, "", 1.0, [pos] if pos >= 0 else [], [form]))
    return out


def read_articles(path: str | Path, stats: ReadStats | None = None) -> list[News]:
    """Read ``articles.parquet`` into News records.

    news_id = str(article_id); category = category_str; subcategory = str(first subcategory id)
    or ""; sentiment = index of sentiment_label in SENTIMENT_LABELS (case-insensitive) or -1;
    abstract = subtitle; title_entities from ner_clusters/entity_groups.
    """
    path = Path(path)
    st = stats if stats is not None else ReadStats()
    pf = _open(path, ARTICLE_REQUIRED)
    names = set(pf.schema_arrow.names)
    cols = list(ARTICLE_REQUIRED) + [c for c in ARTICLE_OPTIONAL if c in names]
    out: list[News] = []
    seen: dict[str, int] = {}
    row = 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=cols):
        data = batch.to_pydict()
        n = batch.num_rows
        empty: list[Any] = [None] * n
        get = {c: data.get(c, empty) for c in cols + list(ARTICLE_OPTIONAL)}
        for i in range(n):
            row += 1
            aid = get["article_id"][i]
            if aid is None:
                raise DataError(path, row, "expected a non-null article_id")
            nid = str(aid)
            if nid in seen:
                raise DataError(
                    path, row, f"expected unique article_id, {nid} already in row {seen[nid]}"
                )
            seen[nid] = row
            title = get["title"][i] or ""
            subs = get["subcategory"][i]
            label = get["sentiment_label"][i]
            sentiment = -1
            if label is not None:
                sentiment = _SENTIMENT.get(str(label).lower(), -1)
                if sentiment < 0:
                    st["unknown_sentiment_label"] += 1
            clusters, groups = get["ner_clusters"][i], get["entity_groups"][i]
            if clusters and (groups is None or len(groups) != len(clusters)):
                st["ner_groups_length_mismatch"] += 1  # entities keep Type "" where unmatched
            ents = _title_entities(title, clusters, groups)
            out.append(
                News(
                    news_id=nid,
                    category=get["category_str"][i] or "",
                    subcategory=str(subs[0]) if subs else "",
                    title=title,
                    abstract=get["subtitle"][i] or "",
                    url=get["url"][i] or "",
                    title_entities=ents,
                    sentiment=sentiment,
                )
            )
    if not out:
        raise DataError(path, None, "no rows: expected one row per article")
    st["news"] += len(out)
    return out


def read_history(path: str | Path) -> dict[Any, list[str]]:
    """user_id -> clicked article ids as strings, ordered by impression_time_fixed (oldest first).

    The sort is stable, so clicks with equal times keep the file's order; null times sort first.
    """
    path = Path(path)
    pf = _open(path, HISTORY_REQUIRED)
    out: dict[Any, list[str]] = {}
    row = 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=list(HISTORY_REQUIRED)):
        users = batch.column("user_id").to_pylist()
        times = batch.column("impression_time_fixed").to_pylist()
        ids = batch.column("article_id_fixed").to_pylist()
        for u, ts, aids in zip(users, times, ids):
            row += 1
            aids = aids or []
            ts = ts or []
            if len(ts) != len(aids):
                raise DataError(
                    path,
                    row,
                    f"expected impression_time_fixed and article_id_fixed of equal length, "
                    f"got {len(ts)} and {len(aids)}",
                )
            if u in out:
                raise DataError(path, row, f"expected one row per user_id, {u} repeated")
            order = sorted(
                range(len(aids)), key=lambda k: (ts[k] is not None, ts[k] or dt.datetime.min)
            )
            out[u] = [str(aids[k]) for k in order]
    return out


def _has_clicks(pf: pq.ParquetFile) -> bool:
    """True when the clicks column exists and holds at least one click (test: absent or empty)."""
    if CLICKS not in pf.schema_arrow.names:
        return False
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[CLICKS]):
        for clicks in batch.column(CLICKS).to_pylist():
            if clicks:
                return True
    return False


def iter_behaviors(
    split_folder: str | Path, stats: ReadStats | None = None
) -> Iterator[Impression]:
    """Stream one split's impressions joined with its users' histories.

    candidates = article_ids_inview; labels = 1 where the candidate is in article_ids_clicked,
    or None for the whole split when it has no clicks (EBNeRD test). A user missing from
    history.parquet gets an empty history (counted in ``stats["missing_history_user"]``).
    """
    folder = Path(split_folder)
    st = stats if stats is not None else ReadStats()
    beh_path = folder / "behaviors.parquet"
    pf = _open(beh_path, BEHAVIOR_REQUIRED)
    history = read_history(folder / "history.parquet")
    labeled = _has_clicks(pf)
    cols = list(BEHAVIOR_REQUIRED) + ([CLICKS] if labeled else [])
    row = 0
    n = n_empty = n_missing = 0
    try:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=cols):
            imp_ids = batch.column("impression_id").to_pylist()
            users = batch.column("user_id").to_pylist()
            times = batch.column("impression_time").to_pylist()
            inviews = batch.column("article_ids_inview").to_pylist()
            clicked = batch.column(CLICKS).to_pylist() if labeled else [None] * batch.num_rows
            for imp_id, user, time, inview, clicks in zip(imp_ids, users, times, inviews, clicked):
                row += 1
                if not inview:
                    raise DataError(beh_path, row, "expected a non-empty article_ids_inview")
                if time is None:
                    raise DataError(beh_path, row, "expected a non-null impression_time")
                hist = history.get(user)
                if hist is None:
                    n_missing += 1
                    hist = []
                if not hist:
                    n_empty += 1
                labels = None
                if labeled:
                    click_set = set(clicks or ())
                    labels = [1 if a in click_set else 0 for a in inview]
                    if not clicks:
                        st["impressions_without_click"] += 1
                    elif sum(labels) != len(click_set):
                        st["clicked_not_in_inview"] += 1
                yield Impression(
                    str(imp_id), str(user), time, list(hist), [str(a) for a in inview], labels, row
                )
                n += 1
        if n == 0:
            raise DataError(beh_path, None, "no rows: expected one row per impression")
    finally:
        st["impressions"] += n
        st["empty_history"] += n_empty
        st["missing_history_user"] += n_missing
