"""The prepared folder, read in one place: manifest, splits, shards, vocabularies, tokenizer
(docs/design.md §2 Data contracts).

``mtrec prepare`` (``mtrec_dist.data.prepare``) writes the folder; the trainers, the training
stream, the evaluator and the model registry read it only through this module, so every reader
gets the same checks, the same error type (:class:`DataError`, naming the file and what was
expected) and the same answer to each question:

* a split not in the manifest is a ``DataError`` listing the prepared splits;
* a split is labeled iff its manifest entry says ``"labeled": true`` (prepare writes it for
  every split; there is no guess from the split's name);
* a shard is described by its manifest entry: path, sha256, impressions, clicks.

The folder layout is in ``mtrec_dist.data.batch``; the shard file (impressions packed in
groups, one tar member per group) is written and read by ``mtrec_dist.data.shardfile``.
``format_version`` 2 is that layout; a folder of an older version (one tar sample of ``.npy``
members per impression) is refused with a DataError that says to re-run ``mtrec prepare``.

Users (LSTUR's and NPA's user-ID embeddings): ``vocab/users.json`` lists the user ids of the
TRAIN split's behaviors, index 0 = ``"<unk>"`` (the unknown user), then every distinct train
user id in sorted (string) order, so train users are 1..n. A dev/test user that never occurs in
train is stored as 0 (counted in the split's ``stats.unknown_user``); without a ``train`` split
every user is 0. The manifest records the vocabulary size (incl. 0) as ``news.vocab.users``,
which is what the user-ID models size their embedding tables from.

A manifest without ``news.vocab.users`` (hand-made folders) reads every impression as user 0;
a model that needs users (LSTUR, NPA: see :func:`require_users`) refuses it at build time with a
DataError naming the manifest and saying to re-run ``mtrec prepare``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrec_dist.config import ConfigError
from mtrec_dist.data.tables import DataError

FORMAT_VERSION = 2  # 2: impressions packed in groups (data/shardfile.py); 1: a tar sample each
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
VOCABS = ("category", "subcategory", "entities")  # news vocabularies (the vocab fingerprint)
USER_VOCAB = "users"  # vocab/users.json: "<unk>" then the train split's user ids, sorted

_REQUIRED = ("format_version", "tokenizer", "title_len", "history_len", "news", "splits")
_SHARD_KEYS = ("path", "sha256", "impressions", "clicks")


def shard_pattern(split: str) -> str:
    """The writer's file name pattern of a split's shards, relative to the prepared folder."""
    return f"{SHARD_DIR}/{split}-%06d.tar"


def check_impression_id(key: str) -> str | None:
    """Why ``key`` cannot be an impression id of a shard (None if it can).

    A group stores its ids newline-joined, so an id holds no newline; ``.`` and ``/`` stay
    refused so that an id remains a valid webdataset sample key (webdataset splits a member
    name at its first ``.``; ``/`` makes a folder), e.g. for a per-impression export.
    """
    if not key:
        return "is empty"
    if "." in key or "/" in key or "\n" in key:
        return "contains '.', '/' or a newline"
    return None


# ------------------------------------------------------------------------------- manifest


def load_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json``; a missing folder says to run ``mtrec prepare``."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest.json; run `mtrec prepare` first (or set data.prepared to a "
            "prepared folder)"
        )
    m = _read_json(path, dict, "a JSON object")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise DataError(path, None, f"expected keys {list(_REQUIRED)}, missing {missing}")
    if m["format_version"] != FORMAT_VERSION:
        raise DataError(
            path,
            None,
            f"format_version {m['format_version']!r}: expected {FORMAT_VERSION} (shards of "
            "impression groups); this folder was prepared by an older version: re-run "
            "`mtrec prepare`",
        )
    if not isinstance(m["tokenizer"], dict) or "vocab_hash" not in m["tokenizer"]:
        raise DataError(path, None, "tokenizer: expected a vocab_hash")
    if not isinstance(m["news"], dict) or not isinstance(m["news"].get("count"), int):
        raise DataError(path, None, "news: expected an integer 'count'")
    if not isinstance(m["splits"], dict):
        raise DataError(path, None, "splits: expected an object")
    return m


def num_users(manifest: dict[str, Any]) -> int | None:
    """Rows of the user vocabulary (incl. 0 = unknown), or None for a folder prepared before
    users were recorded (every impression then reads as user 0)."""
    n = manifest.get("news", {}).get("vocab", {}).get(USER_VOCAB)
    return int(n) if isinstance(n, int) else None


def require_users(manifest: dict[str, Any], prepared_dir: str | Path | None, what: str) -> int:
    """The user vocabulary size; a DataError naming the manifest when the folder has none."""
    n = num_users(manifest)
    if n is None:
        raise DataError(
            _where(prepared_dir),
            None,
            f"no user vocabulary (news.vocab.{USER_VOCAB}): {what} needs user ids, and this "
            "folder was prepared before they were recorded; re-run `mtrec prepare`",
        )
    return n


def _where(prepared_dir: str | Path | None) -> Path:
    return Path(prepared_dir) / MANIFEST if prepared_dir is not None else Path(MANIFEST)


def split_info(
    manifest: dict[str, Any], split: str, prepared_dir: str | Path | None = None
) -> dict[str, Any]:
    """The manifest entry of ``split``; a missing split or a malformed shard entry is a
    DataError naming the manifest (its full path when ``prepared_dir`` is given)."""
    splits = manifest["splits"]
    if split not in splits:
        raise DataError(
            _where(prepared_dir), None, f"no split {split!r}; prepared splits: {sorted(splits)}"
        )
    info = splits[split]
    for i, sh in enumerate(info.get("shards", [])):
        for k in _SHARD_KEYS:
            if k not in sh:
                raise DataError(
                    _where(prepared_dir), None, f"splits.{split}.shards[{i}]: expected key {k!r}"
                )
    return info


def splits(manifest: dict[str, Any]) -> list[str]:
    """Prepared split names in manifest order."""
    return list(manifest["splits"])


def is_labeled(
    manifest: dict[str, Any], split: str, prepared_dir: str | Path | None = None
) -> bool:
    """True iff the manifest says the split has labels (absent = unlabeled)."""
    return split_info(manifest, split, prepared_dir).get("labeled") is True


def require_labeled(
    manifest: dict[str, Any], split: str, prepared_dir: str | Path | None = None, hint: str = ""
) -> None:
    """DataError naming the manifest when ``split`` has no labels."""
    if not is_labeled(manifest, split, prepared_dir):
        raise DataError(_where(prepared_dir), None, f"split {split!r} has no labels{hint}")


@dataclass(frozen=True)
class Shard:
    """One shard as the manifest describes it; the reader checks the file against it."""

    path: Path
    sha256: str
    impressions: int
    clicks: int


def shards(prepared_dir: str | Path, manifest: dict[str, Any], split: str) -> list[Shard]:
    """The split's shards; FileNotFoundError names the first one missing on disk."""
    out = []
    for sh in split_info(manifest, split, prepared_dir)["shards"]:
        p = Path(prepared_dir) / sh["path"]
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: shard of split {split!r} listed in the manifest is missing; "
                "run `mtrec prepare` again"
            )
        out.append(Shard(p, str(sh["sha256"]), int(sh["impressions"]), int(sh["clicks"])))
    return out


# ------------------------------------------------------------------------------- vocabularies


def vocab_path(prepared_dir: str | Path, name: str) -> Path:
    if name not in VOCABS + (USER_VOCAB,):
        raise ValueError(f"vocabulary {name!r}: expected one of {VOCABS + (USER_VOCAB,)}")
    return Path(prepared_dir) / "vocab" / f"{name}.json"


def read_vocab(prepared_dir: str | Path, name: str) -> list:
    """One vocabulary (index = id used in the news table); a broken file names itself."""
    path = vocab_path(prepared_dir, name)
    return _read_json(path, list, "a JSON list")


def _read_json(path: Path, kind: type, what: str) -> Any:
    """A JSON file of the prepared folder; a broken or mistyped one is a DataError naming it."""
    try:
        v = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(
            path, e.lineno, f"expected JSON ({e.msg}); re-run `mtrec prepare`"
        ) from None
    if not isinstance(v, kind):
        raise DataError(path, None, f"expected {what}")
    return v


def vocab_names(prepared_dir: str | Path) -> dict[str, list[str]] | None:
    """Category names and entity surface forms (index 0 = ""), for the models' AMF init and
    MINER's category vectors; vocabularies absent from the folder are left out."""
    out: dict[str, list[str]] = {}
    if vocab_path(prepared_dir, "category").is_file():
        out["category"] = [str(x) for x in read_vocab(prepared_dir, "category")]
    if vocab_path(prepared_dir, "entities").is_file():
        rows = read_vocab(prepared_dir, "entities")
        out["entities"] = [r.get("surface", "") if isinstance(r, dict) else str(r) for r in rows]
        out["entities"][0] = ""  # "<none>"
    return out or None


def vocab_fingerprint(prepared_dir: str | Path) -> str:
    """sha256 over the category, subcategory and entity vocabularies of a prepared folder.

    Models index these vocabularies (category heads, AMF, MINER's category vectors), so a
    checkpoint is only valid on data whose vocabularies hash the same.
    """
    h = hashlib.sha256()
    for name in VOCABS:
        h.update(name.encode() + b"\0")
        h.update(vocab_path(prepared_dir, name).read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------- tokenizer


def check_tokenizer(
    manifest: dict[str, Any], fingerprint: dict, encoder: str | None = None
) -> None:
    """Refuse a model whose tokenizer differs from the one the titles were tokenized with."""
    got = manifest["tokenizer"]
    if got["vocab_hash"] != fingerprint["vocab_hash"]:
        enc = encoder or "<the model's encoder>"
        raise ConfigError(
            f"tokenizer mismatch: prepared with {got.get('encoder', '?')} "
            f"({got.get('name', '?')}, vocab_size {got.get('vocab_size', '?')}, "
            f"vocab_hash {got['vocab_hash']}), model uses {fingerprint.get('name', '?')} "
            f"(vocab_size {fingerprint.get('vocab_size', '?')}, vocab_hash "
            f"{fingerprint['vocab_hash']}): re-run `mtrec prepare` with model.encoder={enc}"
        )
