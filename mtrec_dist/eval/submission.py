"""The MIND competition's submission format: write ``prediction.zip``, score one against truth.

``prediction.txt`` has one line per impression, in the behaviors file's order::

    <ImpressionID> [r1,r2,...]      r_i = 1-based rank of candidate i (1 = highest score)

zipped as ``prediction.zip`` with ``prediction.txt`` at the zip's root. ``truth.txt`` (the organisers' side) has
``<ImpressionID> [l1,l2,...]`` with 0/1 labels. The leaderboard scorer turns ranks back into
scores as ``-rank`` and computes AUC/MRR/nDCG per impression (:mod:`mtrec_dist.metrics`).

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

import re
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mtrec_dist.data.tables import DataError
from mtrec_dist.metrics import compute_metrics
from mtrec_dist.utils import atomic_open, offsets_of

PREDICTION_NAME = "prediction.txt"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry time: the same predictions give the same zip bytes
# Deflate level of prediction.txt. Level 1 compresses MIND-large's 2.37M test lines (~270 MB)
# about 15x faster than zlib's default 6 (measured: ~0.7M vs ~50k lines/s, which made the
# default the evaluator's largest single cost), for a zip ~17% larger (0.41 vs 0.35 of the
# text). The leaderboard reads any level; prediction.txt itself is the same bytes.
ZIP_LEVEL = 1
INT = r"(?:0|[1-9][0-9]*)"  # a JSON integer (the scorer json.loads the list): no sign, no 0-padding
LINE = re.compile(rf"(\S+) \[({INT}(?:,{INT})*)?\]")  # the whole line: id, one space, [v1,...]


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


# (ids [n] str, sizes [n], flat ranks [sum sizes]): the unit the writer takes; ``ids`` and
# ``sizes`` are the columns of the scored Impressions (docs/design.md §2.2), ranks per candidate
Block = tuple[np.ndarray, np.ndarray, np.ndarray]
_WS = re.compile(r"\s")  # what the leaderboard splits a line on (LINE's \S complement)


def format_block(ids: np.ndarray, sizes: np.ndarray, ranks: np.ndarray) -> bytes:
    """The ``prediction.txt`` lines of ``n`` impressions at once: ``f"{id} [{r1},...,{rk}]\n"``.

    Built as one byte array by index arithmetic (ids copied in, rank digits computed per
    position), so writing the 2.37M lines of MIND-large's test split costs a few numpy passes
    per block instead of a Python string per impression. Same bytes as :func:`format_line` per
    line; inputs are not validated here (:func:`write_prediction_blocks` does that first).
    """
    id_list = [str(i) for i in np.asarray(ids).tolist()]
    sizes = np.asarray(sizes, dtype=np.int64)
    ranks = np.asarray(ranks, dtype=np.int64)
    n, total = len(id_list), int(ranks.size)
    text = "\n".join(id_list)
    joined = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if joined.size == len(text):  # ASCII ids: one byte per character
        id_len = np.fromiter(map(len, id_list), dtype=np.int64, count=n)
    else:
        id_len = np.fromiter((len(i.encode("utf-8")) for i in id_list), dtype=np.int64, count=n)
    top = int(ranks.max()) if total else 0
    tokens = [f"{r}{sep}".encode() for sep in ",]" for r in range(top + 1)]  # [2 * (top + 1)]
    width = len(tokens[-1])  # the longest token
    table = np.zeros((len(tokens), width), dtype=np.uint8)  # token bytes, zero padded
    for i, t in enumerate(tokens):
        table[i, : len(t)] = np.frombuffer(t, dtype=np.uint8)
    tok_len = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    cand_off = offsets_of(sizes)
    last = np.zeros(total, dtype=np.int64)  # 1 for each impression's last candidate (its "]")
    last[cand_off[1:][sizes > 0] - 1] = 1
    which = last * (top + 1) + ranks  # row of `table` for each candidate
    tok = offsets_of(tok_len[which])
    tokens_len = tok[cand_off[1:]] - tok[cand_off[:-1]]  # a line's ranks, ',' and ']'
    line_len = id_len + 2 + tokens_len + (sizes == 0) + 1  # id, " [", tokens (or "]"), "\n"
    line_start = offsets_of(line_len)
    buf = np.empty(int(line_start[-1]) + width, dtype=np.uint8)  # + room for the last padding
    # tokens: every token is written `width` bytes wide, byte b in pass b = width-1 .. 0. A
    # token's padding lands on the next tokens' bytes (or the line end), which are written in a
    # later pass (a smaller b) or after this loop, so every real byte is final.
    imp = np.repeat(np.arange(n), sizes)
    pos = (line_start[:-1] + id_len + 2 - tok[cand_off[:-1]])[imp] + tok[:-1]  # token starts
    for b in range(width - 1, -1, -1):
        buf[pos + b] = table[which, b]
    empty = sizes == 0  # "id []": no token carries the ']'
    buf[line_start[:-1][empty] + id_len[empty] + 2] = ord("]")
    # ids: byte k of id i goes from joined[src_i + k] to buf[line_start_i + k]
    owner = np.repeat(np.arange(n), id_len)
    id_start = offsets_of(id_len)
    within = np.arange(int(id_start[-1])) - id_start[owner]
    buf[line_start[owner] + within] = joined[id_start[owner] + owner + within]  # +1 per "\n"
    buf[line_start[:-1] + id_len] = ord(" ")
    buf[line_start[:-1] + id_len + 1] = ord("[")
    buf[line_start[1:] - 1] = ord("\n")
    buf = buf[: line_start[-1]]
    return buf.tobytes()


def _first_bad_line(
    ids: np.ndarray,
    sizes: np.ndarray,
    ranks: np.ndarray,
    first: int,
    exp_ids: np.ndarray | None,
    exp_sizes: np.ndarray | None,
) -> int | None:
    """Index in the block of the first line any check of :func:`_check_line` would reject
    (vectorised), None when every line passes."""
    n = int(sizes.size)
    bad = np.zeros(n, dtype=bool)
    if exp_ids is not None:
        exp = exp_ids[first : first + n]
        bad[exp.size :] = True  # beyond the expected impressions
        bad[: exp.size] |= ids[: exp.size] != exp
    if exp_sizes is not None:
        exp_n = exp_sizes[first : first + n]
        bad[exp_n.size :] = True
        bad[: exp_n.size] |= sizes[: exp_n.size] != exp_n
    imp = np.repeat(np.arange(n), sizes)
    in_range = (ranks >= 1) & (ranks <= sizes[imp])
    off = offsets_of(sizes)
    slot = np.where(in_range, off[imp] + ranks - 1, 0)  # each rank's slot in its impression
    twice = np.bincount(slot[in_range], minlength=int(ranks.size))[slot] > 1
    bad |= np.bincount(imp, weights=~in_range | twice, minlength=n) > 0  # not a permutation
    bad |= sizes == 0
    bad |= np.strings.str_len(ids) == 0
    ws = _WS.search("\0".join(ids.tolist()))  # whitespace inside an id (NUL is not)
    if ws is not None:
        bad[int(np.searchsorted(np.cumsum(np.strings.str_len(ids) + 1), ws.start(), "right"))] = (
            True
        )
    hit = np.flatnonzero(bad)
    return int(hit[0]) if hit.size else None


def _check_line(
    imp: str,
    i: int,
    ranks: list[int],
    exp_ids: list[str] | None,
    exp_pos: dict[str, int] | None,
    seen: set,
    n_exp: int | None,
) -> None:
    """Every check of one line (line ``i + 1``); raises :class:`PredictionError` naming it."""
    if exp_ids is not None:
        _check_order(imp, i, exp_ids, exp_pos, seen)
    elif imp in seen:
        raise PredictionError(f"impression {imp}: appears more than once")
    seen.add(imp)
    _check_ranks(imp, ranks, n_exp, "")
    text = format_line(imp, ranks)
    if parse_line(text) is None:  # e.g. an id holding whitespace
        raise PredictionError(
            f"impression {imp!r} (line {i + 1}): {text[:80]!r} is not a "
            "leaderboard line '<id> [r1,r2,...]' (an id without whitespace)"
        )


def write_prediction_blocks(
    blocks: Iterable[Block],
    out_zip_path: str | Path,
    expected_ids: Sequence[str] | np.ndarray | None = None,
    expected_sizes: Sequence[int] | np.ndarray | None = None,
    seconds: dict[str, float] | None = None,
) -> Path:
    """Validate blocks of impressions and write them as ``prediction.txt`` in a zip.

    A block is ``(ids [n], sizes [n], ranks [sum sizes])``: candidate ``j`` of impression ``i``
    has rank ``ranks[offset_i + j]``. Checks, vectorised per block: every expected impression
    exactly once and in order (when ``expected_ids`` is given), every rank list a permutation
    of 1..n with n = ``expected_sizes[i]`` when given, every id a leaderboard id (no
    whitespace). The first failing line is then re-checked line by line, so the
    :class:`PredictionError` (a ValueError) names it exactly as a per-line writer would; the
    final path is only created (by an atomic rename) after every line passed. ``seconds``:
    ``seconds["write"]`` accumulates the time spent here (checks, formatting, compression),
    apart from the time the ``blocks`` iterator takes to produce them.
    """
    t_write = 0.0
    out = Path(out_zip_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    exp_ids = None if expected_ids is None else np.asarray([str(x) for x in expected_ids])
    exp_sizes = None if expected_sizes is None else np.asarray(expected_sizes, dtype=np.int64)
    if exp_ids is not None and np.unique(exp_ids).size != exp_ids.size:
        raise ValueError("expected_ids lists an impression more than once")
    if exp_ids is not None and exp_sizes is not None and exp_sizes.size != exp_ids.size:
        raise ValueError("expected_ids and expected_sizes differ in length")
    with atomic_open(out, "wb") as fh:  # no partial zip at the final path, ever
        seen: set[str] = set()  # ids written so far (only without expected_ids)
        n_lines = 0
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            info = zipfile.ZipInfo(PREDICTION_NAME, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info._compresslevel = ZIP_LEVEL  # public as `compress_level` from Python 3.13
            with zf.open(info, "w") as raw:
                for ids, sizes, ranks in blocks:
                    t0 = time.perf_counter()
                    ids = np.asarray(ids).astype(str)
                    sizes = np.asarray(sizes, dtype=np.int64)
                    ranks = np.asarray(ranks, dtype=np.int64)
                    if exp_ids is None:  # duplicates are tracked line by line: check every line
                        k = 0
                    else:  # vectorised; a bad line is then named as a per-line writer would
                        k = _first_bad_line(ids, sizes, ranks, n_lines, exp_ids, exp_sizes)
                    if k is not None:
                        _check_lines(ids, sizes, ranks, n_lines, k, exp_ids, exp_sizes, seen)
                    raw.write(format_block(ids, sizes, ranks))
                    n_lines += int(ids.size)
                    t_write += time.perf_counter() - t0
                if exp_ids is not None and n_lines < exp_ids.size:
                    raise PredictionError(
                        f"impression {exp_ids[n_lines]} missing: the prediction ends after "
                        f"{n_lines} of {exp_ids.size} impressions"
                    )
                if exp_sizes is not None and n_lines != exp_sizes.size:
                    raise PredictionError(
                        f"{n_lines} impressions written, expected {exp_sizes.size}"
                    )
    if seconds is not None:
        seconds["write"] = seconds.get("write", 0.0) + t_write
    return out


def _check_lines(
    ids: np.ndarray,
    sizes: np.ndarray,
    ranks: np.ndarray,
    first: int,
    k: int,
    exp_ids: np.ndarray | None,
    exp_sizes: np.ndarray | None,
    seen: set,
) -> None:
    """Line-by-line checks of a block's lines ``k..``: the error names the first bad line."""
    off = offsets_of(sizes)
    exp_list = None if exp_ids is None else exp_ids.tolist()
    exp_pos = None if exp_list is None else {x: i for i, x in enumerate(exp_list)}
    if exp_list is not None:
        seen = set(exp_list[: first + k])  # every earlier line was the expected one
    for j in range(k, int(ids.size)):
        i = first + j
        n_exp = None if exp_sizes is None or i >= exp_sizes.size else int(exp_sizes[i])
        _check_line(
            str(ids[j]), i, ranks[off[j] : off[j + 1]].tolist(), exp_list, exp_pos, seen, n_exp
        )


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
