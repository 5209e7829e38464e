"""Pretrained vectors from text files: MIND's entity/relation embeddings and GloVe word vectors.

Both formats are one vector per line, ``key v_1 v_2 ... v_d``:

- MIND ``entity_embedding.vec`` / ``relation_embedding.vec`` (one per split folder): the key is a
  WikidataId (``Q42``) or relation id (``P31``), the 100 values are TransE vectors learned on the
  WikiKG subgraph of the dataset's entities, separated by TABs (with a trailing TAB);
- GloVe ``glove.840B.300d.txt`` and friends: the key is a word, values separated by spaces.

Lines are split on any whitespace, so both read the same way. Only the keys asked for are kept
(a GloVe file holds 2.2M words; the models need the tokenizer's ~30k), and a line whose length
or numbers are wrong is an error naming the file and line (:class:`DataError`), not a silently
short vector.

Where the vectors go: ``mtrec prepare`` aligns the entity vectors to the entity vocabulary and
writes ``<prepared>/vocab/entity_vectors.npy`` (float32 [n_entities, d]; row 0 "<none>" and
entities without a vector are NaN rows) and reports the coverage in the manifest
(``news.entity_vectors``); AMF reads that file (:mod:`mtrec_dist.models.encoders`). Word vectors
are read at model build time from ``data.word_vectors`` (the classic models'
:mod:`mtrec_dist.models.classic`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mtrec_dist.data.tables import DataError

ENTITY_FILE = "entity_embedding.vec"
ENTITY_VECTORS_NPY = "entity_vectors.npy"


def read_vectors(
    path: str | Path, keys: Iterable[str] | None = None, dim: int | None = None
) -> dict[str, np.ndarray]:
    """``{key: float32 [d]}`` for the lines of ``path`` whose key is in ``keys`` (all if None).

    Every line must hold a key and the same number ``d`` of numbers (``dim`` when given,
    otherwise the first line's); a blank line is skipped. The first occurrence of a key wins.
    Raises FileNotFoundError / DataError naming the file (and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: vector file does not exist")
    wanted = None if keys is None else set(keys)
    out: dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise DataError(path, lineno, "expected a key followed by numbers")
            if len(parts) - 1 != dim:
                raise DataError(
                    path, lineno, f"expected {dim} numbers after the key, got {len(parts) - 1}"
                )
            key = parts[0]
            if (wanted is not None and key not in wanted) or key in out:
                continue
            try:
                out[key] = np.array(parts[1:], dtype=np.float32)
            except ValueError as e:
                raise DataError(path, lineno, f"not a number in the vector of {key!r}: {e}") from e
    if dim is None:
        raise DataError(path, None, "no vectors in the file")
    return out


def split_vector_files(root: str | Path, folders: Iterable[str | Path], name: str) -> list[Path]:
    """The ``name`` files (e.g. ``entity_embedding.vec``) present in the split ``folders``."""
    out = []
    for folder in folders:
        p = Path(root) / folder / name
        if p.is_file():
            out.append(p)
    return out


def entity_matrix(
    files: list[Path], entity_ids: list[str], dim: int | None = None
) -> tuple[np.ndarray, dict]:
    """Vectors of ``entity_ids`` (row i = entity i; NaN where no file has it) and coverage.

    The files are read in order and the first vector of an id wins (MIND repeats most entities
    across the train/dev/test files with identical vectors). ``entity_ids[0]`` is the
    vocabulary's "<none>" row and is never looked up.
    """
    found: dict[str, np.ndarray] = {}
    for p in files:
        rest = [e for e in entity_ids[1:] if e not in found]
        got = read_vectors(p, rest, dim)
        if got:
            d = len(next(iter(got.values())))
            if dim is not None and d != dim:
                raise DataError(p, None, f"vectors have {d} values, other files {dim}")
            dim = d
        found.update(got)
    dim = dim or 0
    mat = np.full((len(entity_ids), dim), np.nan, dtype=np.float32)
    for i, e in enumerate(entity_ids):
        if i > 0 and e in found:
            mat[i] = found[e]
    n = max(len(entity_ids) - 1, 0)
    hit = int(sum(1 for e in entity_ids[1:] if e in found))
    info = {
        "files": [str(p) for p in files],
        "dim": dim,
        "entities": n,
        "with_vector": hit,
        "without_vector": n - hit,
    }
    return mat, info


def write_entity_vectors(
    root: str | Path, folders: Iterable[str | Path], entity_vocab: list[dict], vocab_dir: Path
) -> dict:
    """``mtrec prepare``'s hook: align the split folders' ``entity_embedding.vec`` to the entity
    vocabulary, write ``vocab/entity_vectors.npy`` and return the coverage for the manifest.

    No file in any split folder: nothing is written and the coverage says so (AMF then starts
    its entity embeddings from the encoder's word pieces, as before).
    """
    files = split_vector_files(root, folders, ENTITY_FILE)
    ids = [str(d.get("id", "")) if isinstance(d, dict) else str(d) for d in entity_vocab]
    if not files:
        n = max(len(ids) - 1, 0)
        return {"files": [], "dim": 0, "entities": n, "with_vector": 0, "without_vector": n}
    mat, info = entity_matrix(files, ids)
    np.save(Path(vocab_dir) / ENTITY_VECTORS_NPY, mat, allow_pickle=False)
    return info


def word_matrix(path: str | Path, vocab: list[str], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """GloVe vectors for a word-piece vocabulary: (float32 [V, dim], found bool [V]).

    A piece is looked up as itself, then lower-cased, then without the WordPiece ``##`` prefix
    (``##ing`` -> ``ing``). Rows with no vector are zero and ``found`` is False there; the caller
    initialises them randomly.
    """

    def forms(w: str) -> list[str]:
        out = [w, w.lower()]
        if w.startswith("##") and len(w) > 2:
            out += [w[2:], w[2:].lower()]
        return out

    wanted = {f for w in vocab for f in forms(w)}
    got = read_vectors(path, wanted, dim)
    mat = np.zeros((len(vocab), dim), dtype=np.float32)
    found = np.zeros(len(vocab), dtype=bool)
    for i, w in enumerate(vocab):
        for f in forms(w):
            if f in got:
                mat[i], found[i] = got[f], True
                break
    return mat, found
