"""The MIND competition's submission format: write ``prediction.zip``, score one against truth.

``prediction.txt`` has one line per impression, in the behaviors file's order::

    <ImpressionID> [r1,r2,...]      r_i = 1-based rank of candidate i (1 = highest score)

zipped as ``prediction.zip`` with ``prediction.txt`` at the zip's root. ``truth.txt`` (the organisers' side) has
``<ImpressionID> [l1,l2,...]`` with 0/1 labels. The leaderboard scorer turns ranks back into
scores as ``-rank`` and computes AUC/MRR/nDCG per impression (:mod:`mtrec_dist.eval.metrics`).

Why validate while writing: a submission with a missing, duplicated or shuffled impression, or
with a rank list that is not a permutation, is rejected (or silently mis-scored) by the
leaderboard hours later; it is far cheaper to fail here, naming the impression.

The line grammar is the leaderboard's, and one function (:func:`parse_line`) holds it for the
writer and the reader alike: ``<id> [<int>,<int>,...]`` with one space, no other whitespace (the
official scorer splits the line on whitespace, so ``[1, 2]`` is three fields), no blank line
inside the file (it reads the prediction line by line against the truth file), and the zip must
hold ``prediction.txt`` at its root (it opens exactly that path after extracting). The zip is
written to a temporary file and renamed, so a failure never leaves a partial zip behind.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mtrec_dist.data.tables import DataError
from mtrec_dist.eval.metrics import compute_metrics, ranks_of, stable_ranks
from mtrec_dist.utils import atomic_open

PREDICTION_NAME = "prediction.txt"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry time: the same predictions give the same zip bytes
INT = r"(?:0|[1-9][0-9]*)"  # a JSON integer (the scorer json.loads the list): no sign, no 0-padding
LINE = re.compile(rf"(\S+) \[({INT}(?:,{INT})*)?\]")  # the whole line: id, one space, [v1,...]


def ranks_from_scores(scores: Sequence[float] | np.ndarray) -> list[int]:
    """1-based rank of each candidate (1 = highest score); ties broken by candidate order."""
    s = np.asarray(scores, dtype=np.float64).reshape(1, -1)
    return stable_ranks(s)[0].tolist()


def ranks_grouped(scores: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Flat ranks for flat scores of impressions with ``sizes`` candidates (the tie rule of
    :func:`mtrec_dist.eval.metrics.ranks_of`, which the dev metrics use too)."""
    return ranks_of(scores, sizes)


def format_line(impression_id: str, ranks: Sequence[int]) -> str:
    return f"{impression_id} [{','.join(map(str, ranks))}]"


class PredictionError(ValueError):
    """A prediction stream or file is not a valid submission; the message names the impression."""


def parse_line(line: str) -> tuple[str, list[int]] | None:
    """``'<id> [v1,v2,...]'`` -> ``(id, [v1, v2, ...])``; None when the line breaks the grammar
    (any other whitespace, an empty line, a sign, a 0-padded or non-integer value)."""
    m = LINE.fullmatch(line)
    if m is None:
        return None
    return m.group(1), [int(v) for v in m.group(2).split(",")] if m.group(2) else []


def _check_ranks(imp: str, ranks: list[int], n_expected: int | None, where: str) -> None:
    n = len(ranks)
    if n_expected is not None and n != n_expected:
        raise PredictionError(
            f"{where}impression {imp}: {n} ranks, expected {n_expected} (one per candidate)"
        )
    if n == 0 or min(ranks) != 1 or max(ranks) != n or len(set(ranks)) != n:
        shown = ranks if n <= 20 else ranks[:20] + ["..."]
        raise PredictionError(
            f"{where}impression {imp}: ranks {shown} are not a permutation of 1..{n}"
        )


def write_prediction(
    lines: Iterable[tuple[str, Sequence[int]]],
    out_zip_path: str | Path,
    expected_ids: Sequence[str] | None = None,
    expected_sizes: Sequence[int] | None = None,
) -> Path:
    """Validate ``(impression_id, ranks)`` pairs and write them as ``prediction.txt`` in a zip.

    Checks: every expected impression exactly once and in order (when ``expected_ids`` is
    given), every rank list a permutation of 1..n with n = ``expected_sizes[i]`` when given.
    A failure raises :class:`PredictionError` (a ValueError) naming the impression; the final
    path is only created (by an atomic rename) after every line passed.
    """
    out = Path(out_zip_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    exp_ids = [str(x) for x in expected_ids] if expected_ids is not None else None
    exp_pos = {x: i for i, x in enumerate(exp_ids)} if exp_ids is not None else None
    if exp_ids is not None and len(exp_pos) != len(exp_ids):
        raise ValueError("expected_ids lists an impression more than once")
    if exp_ids is not None and expected_sizes is not None and len(expected_sizes) != len(exp_ids):
        raise ValueError("expected_ids and expected_sizes differ in length")
    with atomic_open(out, "wb") as fh:  # no partial zip at the final path, ever
        seen: set[str] = set()
        n_lines = 0
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            info = zipfile.ZipInfo(PREDICTION_NAME, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as raw:
                f = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
                for i, (imp, ranks) in enumerate(lines):
                    imp = str(imp)
                    ranks = ranks.tolist() if isinstance(ranks, np.ndarray) else list(ranks)
                    if exp_ids is not None:
                        _check_order(imp, i, exp_ids, exp_pos, seen)
                    elif imp in seen:
                        raise PredictionError(f"impression {imp}: appears more than once")
                    seen.add(imp)
                    n_exp = None if expected_sizes is None else int(expected_sizes[i])
                    _check_ranks(imp, ranks, n_exp, "")
                    text = format_line(imp, ranks)
                    if parse_line(text) is None:  # e.g. an id holding whitespace
                        raise PredictionError(
                            f"impression {imp!r} (line {i + 1}): {text[:80]!r} is not a "
                            "leaderboard line '<id> [r1,r2,...]' (an id without whitespace)"
                        )
                    f.write(text + "\n")
                    n_lines += 1
                if exp_ids is not None and n_lines < len(exp_ids):
                    raise PredictionError(
                        f"impression {exp_ids[n_lines]} missing: the prediction ends after "
                        f"{n_lines} of {len(exp_ids)} impressions"
                    )
                if expected_sizes is not None and n_lines != len(expected_sizes):
                    raise PredictionError(
                        f"{n_lines} impressions written, expected {len(expected_sizes)}"
                    )
                f.flush()
                f.detach()
    return out


def _check_order(imp: str, i: int, exp_ids: list[str], exp_pos: dict[str, int], seen: set) -> None:
    if i >= len(exp_ids):
        raise PredictionError(
            f"impression {imp}: line {i + 1} is beyond the {len(exp_ids)} expected impressions"
        )
    if imp == exp_ids[i]:
        return
    if imp in seen:
        raise PredictionError(f"impression {imp}: appears more than once (again at line {i + 1})")
    if imp not in exp_pos:
        raise PredictionError(f"impression {imp} (line {i + 1}) is not an expected impression")
    raise PredictionError(
        f"impression {exp_ids[i]} missing or out of order: expected it at line {i + 1}, "
        f"got impression {imp}"
    )


# ------------------------------------------------------------------------------ reading / scoring


def _read_text(path: Path) -> list[str]:
    """Lines of a .txt file, or of ``prediction.txt`` at the root of a .zip (prediction.zip)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if PREDICTION_NAME not in names:
                raise DataError(
                    path,
                    None,
                    f"no {PREDICTION_NAME} at the zip's root (members: {names[:10]}); the "
                    f"leaderboard reads exactly {PREDICTION_NAME}: zip it without a folder",
                )
            data = zf.read(PREDICTION_NAME)
    else:
        data = path.read_bytes()
    lines = data.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line
    return lines


def read_bracket_file(path: str | Path) -> tuple[list[str], list[np.ndarray]]:
    """``ImpressionID [a,b,...]`` lines -> (ids, int arrays), in the leaderboard's grammar
    (:func:`parse_line`); a blank line or stray whitespace raises naming the line."""
    path = Path(path)
    ids: list[str] = []
    values: list[np.ndarray] = []
    for line_no, line in enumerate(_read_text(path), start=1):
        parsed = parse_line(line)
        if parsed is None:
            what = "a blank line" if not line.strip() else repr(line[:80])
            raise DataError(
                path,
                line_no,
                f"{what}: expected 'ImpressionID [v1,v2,...]' (one space after the id, no other "
                "whitespace, no blank lines), as the leaderboard reads it",
            )
        ids.append(parsed[0])
        values.append(np.array(parsed[1], dtype=np.int64))
    return ids, values


def score_submission(pred_path: str | Path, truth_path: str | Path) -> dict:
    """Score ``prediction.zip``/``.txt`` against ``truth.txt`` like the leaderboard (score = -rank).

    The two files must list the same impressions in the same order; the first difference is
    named (with both files' line contents) and raises :class:`PredictionError`.
    """
    p_ids, p_ranks = read_bracket_file(pred_path)
    t_ids, t_labels = read_bracket_file(truth_path)
    for i, (a, b) in enumerate(zip(p_ids, t_ids)):
        if a != b:
            raise PredictionError(
                f"{pred_path} and {truth_path} disagree at impression #{i + 1}: "
                f"prediction has {a}, truth has {b}"
            )
    if len(p_ids) != len(t_ids):
        longer, name = (p_ids, pred_path) if len(p_ids) > len(t_ids) else (t_ids, truth_path)
        k = min(len(p_ids), len(t_ids))
        raise PredictionError(
            f"{pred_path} has {len(p_ids)} impressions, {truth_path} has {len(t_ids)}: "
            f"impression {longer[k]} is only in {name}"
        )
    for imp, r, y in zip(p_ids, p_ranks, t_labels):
        _check_ranks(imp, r.tolist(), len(y), f"{pred_path}: ")
        if not np.isin(y, (0, 1)).all():
            raise PredictionError(f"{truth_path}: impression {imp}: labels must be 0 or 1")
    sizes = np.array([len(y) for y in t_labels], dtype=np.int64)
    labels = np.concatenate(t_labels) if t_labels else np.zeros(0)
    scores = -np.concatenate(p_ranks).astype(np.float64) if p_ranks else np.zeros(0)
    return compute_metrics(labels, scores, sizes)
