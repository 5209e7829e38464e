"""prediction.zip writer validation and the leaderboard-style scorer."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from mtrec_dist.data.tables import DataError
from mtrec_dist.eval.submission import PredictionError, score_submission
from tests import oracles
from tests.oracles import compute_metrics_lists, ranks_from_scores, ranks_grouped, write_prediction

IDS = ["1", "2", "3", "10"]
SIZES = [3, 2, 4, 1]
GOOD = [("1", [2, 1, 3]), ("2", [1, 2]), ("3", [4, 3, 2, 1]), ("10", [1])]


def test_ranks_from_scores_ties_by_candidate_order():
    # scores 0.2 0.9 0.2 0.9: the two 0.9s take ranks 1, 2 in candidate order; then the 0.2s.
    assert ranks_from_scores([0.2, 0.9, 0.2, 0.9]) == [3, 1, 4, 2]
    assert ranks_from_scores([5.0]) == [1]
    assert ranks_from_scores([1, 1, 1]) == [1, 2, 3]
    flat = np.array([0.2, 0.9, 0.2, 0.9, 3.0, -1.0, 1.0])
    assert ranks_grouped(flat, np.array([4, 3])).tolist() == [3, 1, 4, 2, 1, 3, 2]


def test_writer_writes_exactly_prediction_txt(tmp_path):
    out = write_prediction(GOOD, tmp_path / "prediction.zip", IDS, SIZES)
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == ["prediction.txt"]
        text = zf.read("prediction.txt").decode()
    assert text == "1 [2,1,3]\n2 [1,2]\n3 [4,3,2,1]\n10 [1]\n"
    assert [p.name for p in tmp_path.iterdir()] == ["prediction.zip"]  # no temp file left


@pytest.mark.parametrize(
    "lines, named",
    [
        (GOOD[:2] + GOOD[3:], "impression 3 missing"),  # 3 missing
        (GOOD[:3], "impression 10 missing"),  # last missing
        (GOOD[:2] + [GOOD[1]] + GOOD[2:], "impression 2: appears more than once"),
        ([GOOD[1], GOOD[0]] + GOOD[2:], "impression 1 missing or out of order"),
        (GOOD[:2] + [("3", [4, 3, 3, 1])] + GOOD[3:], "impression 3: ranks .* not a permutation"),
        (GOOD[:2] + [("3", [0, 1, 2, 3])] + GOOD[3:], "impression 3: ranks .* not a permutation"),
        (GOOD[:1] + [("2", [1, 2, 3])] + GOOD[2:], "impression 2: 3 ranks, expected 2"),
        (GOOD + [("11", [1])], "impression 11: line 5 is beyond"),
        (GOOD[:3] + [("99", [1])], "impression 99 .* not an expected impression"),
    ],
)
def test_writer_rejects_and_leaves_no_zip(tmp_path, lines, named):
    out = tmp_path / "prediction.zip"
    with pytest.raises(PredictionError, match=named):
        write_prediction(lines, out, IDS, SIZES)
    assert list(tmp_path.iterdir()) == []


def test_writer_without_expectations_still_checks_duplicates_and_permutations(tmp_path):
    with pytest.raises(PredictionError, match="impression 1: appears more than once"):
        write_prediction([GOOD[0], GOOD[0]], tmp_path / "p.zip")
    with pytest.raises(PredictionError, match="impression 2: ranks"):
        write_prediction([("2", [2, 2])], tmp_path / "p.zip")
    assert list(tmp_path.iterdir()) == []


def _truth(tmp_path, labels):
    p = tmp_path / "truth.txt"
    p.write_text("".join(f"{i} [{','.join(map(str, y))}]\n" for i, y in zip(IDS, labels)))
    return p


def test_score_submission_of_perfect_and_given_predictions(tmp_path):
    labels = [[0, 1, 0], [1, 0], [0, 0, 1, 1], [1]]
    truth = _truth(tmp_path, labels)
    # perfect prediction: clicked first (ranks from the labels themselves)
    perfect = [(i, ranks_from_scores(y)) for i, y in zip(IDS, labels)]
    write_prediction(perfect, tmp_path / "perfect.zip", IDS, SIZES)
    res = score_submission(tmp_path / "perfect.zip", truth)
    ref = compute_metrics_lists(labels, [np.array(y, float) for y in labels])
    assert res == ref
    # by hand: AUC 1 wherever defined, nDCG 1; MRR 1 except impression 3 (two clicks at ranks
    # 1 and 2: (1 + 1/2) / 2 = 3/4) -> (1 + 1 + 3/4 + 1) / 4 = 15/16.
    assert (res["auc"], res["mrr"], res["ndcg@10"]) == (1.0, 15 / 16, 1.0)
    assert res["auc_skipped"] == 1  # impression 10 has one candidate

    # an arbitrary prediction scores as -rank: e.g. impression 1 ranks [2,1,3] -> click at rank 1
    write_prediction(GOOD, tmp_path / "p.zip", IDS, SIZES)
    res = score_submission(tmp_path / "p.zip", truth)
    ref = compute_metrics_lists(labels, [-np.array(r, float) for _, r in GOOD])
    assert res == ref
    # by hand: AUC over impressions 1, 2, 3 = (1 + 1 + 1) / 3; MRR: imp 1 -> 1, imp 2 -> 1,
    # imp 3 (clicks ranked 2 and 1) -> (1/2 + 1) / 2 = 3/4, imp 10 -> 1: mean = 15/16.
    assert res["auc"] == pytest.approx(1.0) and res["mrr"] == pytest.approx(15 / 16)


def test_score_submission_names_first_differing_impression(tmp_path):
    truth = _truth(tmp_path, [[0, 1, 0], [1, 0], [0, 0, 1, 1], [1]])
    pred = tmp_path / "prediction.txt"
    pred.write_text("1 [2,1,3]\n3 [4,3,2,1]\n2 [1,2]\n10 [1]\n")
    with pytest.raises(PredictionError, match="impression #2: prediction has 3, truth has 2"):
        score_submission(pred, truth)
    pred.write_text("1 [2,1,3]\n2 [1,2]\n3 [4,3,2,1]\n")
    with pytest.raises(PredictionError, match="impression 10 is only in .*truth.txt"):
        score_submission(pred, truth)
    pred.write_text("1 [2,1,3]\n2 [1,2]\n3 [4,3,2]\n10 [1]\n")
    with pytest.raises(PredictionError, match="impression 3: 3 ranks, expected 4"):
        score_submission(pred, truth)


# ------------------------------------------------------------------ the leaderboard's grammar


def _zip(path, members: dict[str, str]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


GOOD_TXT = "1 [2,1,3]\n2 [1,2]\n3 [4,3,2,1]\n10 [1]\n"


@pytest.mark.parametrize(
    "text, line, named",
    [
        ("1 [2, 1, 3]\n2 [1,2]\n3 [4,3,2,1]\n10 [1]\n", 1, r"'1 \[2, 1, 3\]'"),  # spaces in list
        ("1 [2,1,3]\n2 [1,2] \n3 [4,3,2,1]\n10 [1]\n", 2, r"'2 \[1,2\] '"),  # trailing space
        ("1 [2,1,3]\n2  [1,2]\n3 [4,3,2,1]\n10 [1]\n", 2, r"'2  \[1,2\]'"),  # two spaces
        ("1 [2,1,3]\n2\t[1,2]\n3 [4,3,2,1]\n10 [1]\n", 2, r"'2\\t\[1,2\]'"),  # a tab
        ("1 [2,1,3]\n2 [1,2]\n\n3 [4,3,2,1]\n10 [1]\n", 3, "a blank line"),  # blank inside
        ("1 [2,1,3]\n2 [1,2]\n3 [4,3,2,1]\n10 [1]\n\n", 5, "a blank line"),  # blank at the end
        ("1 [2,1,3]\n2 [1,+2]\n3 [4,3,2,1]\n10 [1]\n", 2, r"'2 \[1,\+2\]'"),  # a sign
        ("1 [2,1,3]\n2 [1,02]\n3 [4,3,2,1]\n10 [1]\n", 2, r"'2 \[1,02\]'"),  # not JSON
    ],
)
def test_score_rejects_what_the_leaderboard_rejects_naming_the_line(tmp_path, text, line, named):
    truth = _truth(tmp_path, [[0, 1, 0], [1, 0], [0, 0, 1, 1], [1]])
    pred = tmp_path / "prediction.txt"
    pred.write_text(text)
    with pytest.raises(DataError, match=rf"prediction.txt:{line}: {named}"):
        score_submission(pred, truth)
    # the same text inside a proper zip is rejected the same way
    z = _zip(tmp_path / "prediction.zip", {"prediction.txt": text})
    with pytest.raises(DataError, match=rf"prediction.zip:{line}: {named}"):
        score_submission(z, truth)


def test_score_reads_prediction_txt_at_the_zip_root_only(tmp_path):
    truth = _truth(tmp_path, [[0, 1, 0], [1, 0], [0, 0, 1, 1], [1]])
    ref = score_submission(_zip(tmp_path / "ok.zip", {"prediction.txt": GOOD_TXT}), truth)
    assert ref == compute_metrics_lists(
        [[0, 1, 0], [1, 0], [0, 0, 1, 1], [1]], [-np.array(r, float) for _, r in GOOD]
    )
    for name, members in [
        ("other.zip", {"predictions.txt": GOOD_TXT}),  # a single member of another name
        ("nested.zip", {"sub/prediction.txt": GOOD_TXT}),  # not at the root
    ]:
        member = next(iter(members))
        with pytest.raises(
            DataError,
            match=rf"{name}: no prediction.txt at the zip's root .*"
            rf"'{member}'",
        ):
            score_submission(_zip(tmp_path / name, members), truth)


def test_writer_refuses_an_id_the_leaderboard_would_split(tmp_path):
    with pytest.raises(PredictionError, match=r"impression '1 2' \(line 1\)"):
        write_prediction([("1 2", [1])], tmp_path / "p.zip")
    assert list(tmp_path.iterdir()) == []
    # ids are written as the exact strings given: leading zeros stay
    out = write_prediction([("003", [2, 1]), ("3", [1])], tmp_path / "p.zip", ["003", "3"])
    with zipfile.ZipFile(out) as zf:
        assert zf.read("prediction.txt").decode() == "003 [2,1]\n3 [1]\n"


# ------------------------------------------------------------------ the bulk (block) writer


def test_format_block_equals_one_line_at_a_time():
    """format_block's bytes == format_line per line: multi-digit ranks (1..12,345), ids of
    other lengths and non-ASCII ids, an empty rank list."""
    from mtrec_dist.eval.submission import format_block, format_line

    rng = np.random.default_rng(0)
    sizes = np.array([1, 12345, 3, 0, 101, 9, 10, 2])
    ids = np.array(["7", "003", "Ä1", "x", "12345678901234567890", "é", "10", "9"])
    ranks = [rng.permutation(n) + 1 for n in sizes]
    got = format_block(ids, sizes, np.concatenate(ranks))
    want = "".join(format_line(i, r.tolist()) + "\n" for i, r in zip(ids.tolist(), ranks))
    assert got == want.encode("utf-8")
    assert got.decode().splitlines()[3] == "x []"


@pytest.mark.parametrize(
    "lines, named",
    [
        (GOOD[:2] + [GOOD[1]] + GOOD[2:], "impression 2: appears more than once"),
        (GOOD[:2] + [("3", [4, 3, 3, 1])] + GOOD[3:], "impression 3: ranks .* not a permutation"),
        (GOOD[:3] + [("10", [2])], "impression 10: ranks .* not a permutation"),
        (GOOD[:3] + [("99", [1])], "impression 99 .* not an expected impression"),
        (GOOD + [("11", [1])], "impression 11: line 5 is beyond"),
    ],
)
def test_block_writer_names_the_line_in_a_later_block(tmp_path, monkeypatch, lines, named):
    """Blocks of 2 lines: the first bad line is named as the per-line checks name it, also
    when it is not in the first block."""
    monkeypatch.setattr(oracles, "LINES_PER_BLOCK", 2)
    with pytest.raises(PredictionError, match=named):
        write_prediction(lines, tmp_path / "p.zip", IDS, SIZES)
    assert list(tmp_path.iterdir()) == []


def test_block_writer_reads_blocks_of_arrays(tmp_path):
    from mtrec_dist.eval.submission import write_prediction_blocks

    blocks = [
        (np.array(["1", "2"]), np.array([3, 2]), np.array([2, 1, 3, 1, 2])),
        (np.array(["3", "10"]), np.array([4, 1]), np.array([4, 3, 2, 1, 1])),
    ]
    out = write_prediction_blocks(blocks, tmp_path / "p.zip", IDS, SIZES)
    with zipfile.ZipFile(out) as zf:
        assert zf.read("prediction.txt").decode() == "1 [2,1,3]\n2 [1,2]\n3 [4,3,2,1]\n10 [1]\n"
    with pytest.raises(PredictionError, match="impression 10: 2 ranks, expected 1"):
        bad = blocks[:1] + [(np.array(["3", "10"]), np.array([4, 2]), np.array([4, 3, 2, 1, 1, 2]))]
        write_prediction_blocks(bad, tmp_path / "q.zip", IDS, SIZES)
    assert not (tmp_path / "q.zip").exists()
