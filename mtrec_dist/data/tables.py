"""Internal records that every reader (MIND, EBNeRD, synthetic) produces.

Readers turn source files into these records; ``mtrec prepare`` turns records into the news
table and shards. Nothing downstream of prepare looks at source formats again.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

SENTIMENT_LABELS = ("negative", "neutral", "positive")  # -> 0, 1, 2; -1 = none


@dataclass
class Entity:
    """One entry of MIND's TitleEntities/AbstractEntities JSON list."""

    label: str
    type: str
    wikidata_id: str
    confidence: float
    offsets: list[int]
    surface_forms: list[str]


@dataclass
class News:
    news_id: str
    category: str
    subcategory: str
    title: str
    abstract: str = ""
    url: str = ""
    title_entities: list[Entity] = field(default_factory=list)
    abstract_entities: list[Entity] = field(default_factory=list)
    # Index into SENTIMENT_LABELS, or -1 where the source has no sentiment (MIND).
    sentiment: int = -1


@dataclass
class Impression:
    impression_id: str
    user_id: str
    time: dt.datetime
    history: list[str]  # clicked news ids, oldest first, most recent last
    candidates: list[str]
    labels: list[int] | None  # 0/1 per candidate; None in a test split without labels
    # Line (MIND) or row (EBNeRD) of the source file, for errors; provenance, not content.
    line: int | None = field(default=None, compare=False)


class ReadStats(Counter):
    """Counted skips and fallbacks (reported in manifest.json; nothing is dropped silently)."""

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.items())}


class DataError(ValueError):
    """Bad input: the message names the file, the line and what was expected."""

    def __init__(self, path: object, line: int | None, msg: str):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {msg}")
        self.path, self.line, self.msg = path, line, msg

    def __reduce__(self):  # picklable, so it crosses process and Ray worker boundaries intact
        return (type(self), (self.path, self.line, self.msg))
