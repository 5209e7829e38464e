"""MIND reader/writer: hand-written TSV lines -> exact records, round trips, and every bad input."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from mtrec_dist.data.mind import (
    format_time,
    iter_behaviors,
    parse_time,
    read_news,
    split_dir,
    write_behaviors,
    write_news,
)
from mtrec_dist.data.tables import DataError, Entity, Impression, News, ReadStats

TITLE_ENTS = (
    '[{"Label": "PlayStation (console)", "Type": "J", "WikidataId": "Q10683", '
    '"Confidence": 0.997, "OccurrenceOffsets": [6, 40], "SurfaceForms": ["PlayStation", '
    '"PS"]}, {"Label": "Café Müller", "Type": "O", "WikidataId": "Q1", "Confidence": 1, '
    '"OccurrenceOffsets": [], "SurfaceForms": []}]'
)
NEWS_LINES = [
    "N55528\tlifestyle\tlifestyleroyals\tCafé Müller’s 🚀 plan\tAn abstract.\t"
    f"https://assets.msn.com/labs/mind/AAGH0ET.html\t{TITLE_ENTS}\t[]",
    "N19639\thealth\tweightloss\t50 Worst Habits\t\thttps://x/y.html\t\t"
    '[{"Label": "Belly", "Type": "C", "WikidataId": "Q9", "Confidence": 0.5, '
    '"OccurrenceOffsets": [3], "SurfaceForms": ["belly"]}]',
]
EXPECTED_NEWS = [
    News(
        "N55528",
        "lifestyle",
        "lifestyleroyals",
        "Café Müller’s 🚀 plan",
        "An abstract.",
        "https://assets.msn.com/labs/mind/AAGH0ET.html",
        [
            Entity("PlayStation (console)", "J", "Q10683", 0.997, [6, 40], ["PlayStation", "PS"]),
            Entity("Café Müller", "O", "Q1", 1.0, [], []),
        ],
        [],
    ),
    News(
        "N19639",
        "health",
        "weightloss",
        "50 Worst Habits",
        "",
        "https://x/y.html",
        [],
        [Entity("Belly", "C", "Q9", 0.5, [3], ["belly"])],
    ),
]

BEH_LINES = [
    "1\tU13740\t11/11/2019 9:05:58 AM\tN55189 N42782 N34694\tN55689-1 N35729-0",
    "2\tU91836\t11/12/2019 12:11:50 PM\t\tN20678-0 N39317-0 N58114-1",
    "3\tU73700\t1/2/2020 12:00:00 AM\tN10732\tN23446-1",
]
EXPECTED_BEH = [
    Impression(
        "1",
        "U13740",
        dt.datetime(2019, 11, 11, 9, 5, 58),
        ["N55189", "N42782", "N34694"],
        ["N55689", "N35729"],
        [1, 0],
    ),
    Impression(
        "2",
        "U91836",
        dt.datetime(2019, 11, 12, 12, 11, 50),
        [],
        ["N20678", "N39317", "N58114"],
        [0, 0, 1],
    ),
    Impression("3", "U73700", dt.datetime(2020, 1, 2, 0, 0, 0), ["N10732"], ["N23446"], [1]),
]


def _write(tmp_path, name, lines, eol="\n"):
    p = tmp_path / name
    p.write_bytes((eol.join(lines) + eol).encode("utf-8"))
    return p


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_read_news_exact(tmp_path, eol):
    p = _write(tmp_path, "news.tsv", NEWS_LINES, eol)
    stats = ReadStats()
    assert read_news(p, stats) == EXPECTED_NEWS
    assert stats["news"] == 2


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_iter_behaviors_exact(tmp_path, eol):
    # Trailing blank lines are ignored (and counted).
    p = _write(tmp_path, "behaviors.tsv", BEH_LINES + ["", ""], eol)
    stats = ReadStats()
    assert list(iter_behaviors(p, stats)) == EXPECTED_BEH
    assert stats.as_dict() == {"blank_lines": 2, "empty_history": 1, "impressions": 3}


def test_test_split_without_labels(tmp_path):
    p = _write(tmp_path, "behaviors.tsv", ["9\tU1\t11/15/2019 8:55:22 AM\tN1 N2\tN3 N4 N5"])
    (imp,) = iter_behaviors(p)
    assert imp == Impression(
        "9", "U1", dt.datetime(2019, 11, 15, 8, 55, 22), ["N1", "N2"], ["N3", "N4", "N5"], None
    )


def test_time_parse_and_format_match_strptime():
    cases = {
        "11/15/2019 8:55:22 AM": dt.datetime(2019, 11, 15, 8, 55, 22),
        "1/2/2020 12:00:00 AM": dt.datetime(2020, 1, 2, 0, 0, 0),
        "1/2/2020 12:30:01 PM": dt.datetime(2020, 1, 2, 12, 30, 1),
        "12/31/2019 11:59:59 PM": dt.datetime(2019, 12, 31, 23, 59, 59),
    }
    strptime = dt.datetime.strptime  # the reference parser
    for s, want in cases.items():
        ref = strptime(s, "%m/%d/%Y %I:%M:%S %p")
        assert parse_time(s) == want == ref
        assert format_time(want) == s
    # Shapes outside the fast path still agree with strptime (zero padding, lower-case pm).
    for s in ("01/02/2020 03:04:05 pm", "11/15/2019 8:5:2 AM"):
        ref = strptime(s, "%m/%d/%Y %I:%M:%S %p")
        assert parse_time(s) == ref
    for bad in ("2/30/2019 1:00:00 AM", "11/15/2019 13:00:00 PM", "11/15/2019 0:00:00 AM"):
        with pytest.raises(ValueError):
            dt.datetime.strptime(bad, "%m/%d/%Y %I:%M:%S %p")
        with pytest.raises(ValueError):
            parse_time(bad)


def test_write_news_exact_text_and_round_trip(tmp_path):
    p = tmp_path / "out" / "news.tsv"
    write_news(p, EXPECTED_NEWS)
    text = p.read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == 3
    cols = lines[0].split("\t")
    assert cols[:6] == [
        "N55528",
        "lifestyle",
        "lifestyleroyals",
        "Café Müller’s 🚀 plan",
        "An abstract.",
        "https://assets.msn.com/labs/mind/AAGH0ET.html",
    ]
    assert cols[7] == "[]"
    ents = json.loads(cols[6])
    assert [list(e) for e in ents] == [
        ["Label", "Type", "WikidataId", "Confidence", "OccurrenceOffsets", "SurfaceForms"]
    ] * 2
    assert ents[0] == {
        "Label": "PlayStation (console)",
        "Type": "J",
        "WikidataId": "Q10683",
        "Confidence": 0.997,
        "OccurrenceOffsets": [6, 40],
        "SurfaceForms": ["PlayStation", "PS"],
    }
    assert lines[1].split("\t")[4:7] == ["", "https://x/y.html", "[]"]
    assert read_news(p) == EXPECTED_NEWS
    assert [f.name for f in p.parent.iterdir()] == ["news.tsv"]  # no temp file left behind


def test_write_behaviors_exact_text_and_round_trip(tmp_path):
    p = tmp_path / "behaviors.tsv"
    write_behaviors(p, iter(EXPECTED_BEH))
    assert p.read_text(encoding="utf-8") == "\n".join(BEH_LINES) + "\n"
    assert list(iter_behaviors(p)) == EXPECTED_BEH

    test_imps = [
        Impression("5", "U2", dt.datetime(2019, 11, 15, 20, 5, 9), [], ["N1", "N2"], None),
        Impression("6", "U3", dt.datetime(2019, 11, 16, 0, 0, 1), ["N7"], ["N9"], None),
    ]
    q = tmp_path / "test_behaviors.tsv"
    write_behaviors(q, test_imps)
    assert q.read_text(encoding="utf-8") == (
        "5\tU2\t11/15/2019 8:05:09 PM\t\tN1 N2\n6\tU3\t11/16/2019 12:00:01 AM\tN7\tN9\n"
    )
    assert list(iter_behaviors(q)) == test_imps


def test_write_behaviors_refuses_unrepresentable(tmp_path):
    t = dt.datetime(2019, 11, 15)
    p = tmp_path / "b.tsv"
    with pytest.raises(ValueError, match="labeled or none"):
        write_behaviors(
            p, [Impression("1", "U", t, [], ["N1"], [1]), Impression("2", "U", t, [], ["N1"], None)]
        )
    with pytest.raises(ValueError, match="one label per candidate"):
        write_behaviors(p, [Impression("1", "U", t, [], ["N1", "N2"], [1])])
    with pytest.raises(ValueError, match="contains '-'"):
        write_behaviors(p, [Impression("1", "U", t, ["N-1"], ["N1"], [1])])
    assert not p.exists()
    with pytest.raises(ValueError, match="Title contains a tab"):
        write_news(p, [News("N1", "c", "s", "a\tb")])
    assert list(tmp_path.iterdir()) == []  # failed writes leave neither file nor temp file


GOOD_BEH = "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3-0"


@pytest.mark.parametrize(
    "bad_line, expect",
    [
        ("1\tU1\t11/15/2019 8:55:22 AM\tN1", "expected 5 tab-separated columns, got 4"),
        ("1\tU1\t2019-11-15 08:55:22\tN1\tN2-1", "expected Time like '11/15/2019 8:55:22 AM'"),
        ("1\tU1\t2/30/2019 8:55:22 AM\tN1\tN2-1", "expected Time like"),
        ("1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3-2", "malformed impression token 'N3-2'"),
        ("1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3-", "malformed impression token 'N3-'"),
        ("1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 -1", "malformed impression token '-1'"),
        ("1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N-3-1", "malformed impression token 'N-3-1'"),
        ("1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1  N3-0", "malformed impression token ''"),
        ("1\tU1\t11/15/2019 8:55:22 AM\tN1\t", "malformed impression token ''"),
        ("1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2 N3", "expected <NewsID>-<0|1> like earlier"),
        ("1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3", "malformed impression token 'N3'"),
    ],
)
def test_bad_behaviors_line(tmp_path, bad_line, expect):
    p = _write(tmp_path, "behaviors.tsv", [GOOD_BEH, bad_line])
    with pytest.raises(DataError) as ei:
        list(iter_behaviors(p))
    msg = str(ei.value)
    assert msg.startswith(f"{p}:2: ")
    assert expect in msg
    assert ei.value.line == 2


def test_mixed_unlabeled_then_labeled(tmp_path):
    p = _write(tmp_path, "behaviors.tsv", ["1\tU\t11/15/2019 8:55:22 AM\t\tN2 N3"] * 2 + [GOOD_BEH])
    with pytest.raises(DataError) as ei:
        list(iter_behaviors(p))
    assert str(ei.value).startswith(f"{p}:3: malformed impression token 'N2-1': expected ")
    assert "without label like earlier lines" in str(ei.value)
    # A '-' in a later token of an unlabeled line is also caught.
    q = _write(tmp_path, "b2.tsv", ["1\tU\t11/15/2019 8:55:22 AM\t\tN2 N3-1"])
    with pytest.raises(DataError, match=r"b2.tsv:1: malformed impression token 'N3-1'"):
        list(iter_behaviors(q))


GOOD_NEWS = "N1\tc\ts\tt\ta\tu\t[]\t[]"


def _ent(**over):
    e = {
        "Label": "L",
        "Type": "T",
        "WikidataId": "Q1",
        "Confidence": 1.0,
        "OccurrenceOffsets": [0],
        "SurfaceForms": ["t"],
    }
    e.update(over)
    return e


@pytest.mark.parametrize(
    "ents, expect",
    [
        ("[{", "TitleEntities: expected a JSON list of entities"),
        ('{"Label": "x"}', "TitleEntities: expected a JSON list of entities, got dict"),
        ("[1]", "TitleEntities[0]: expected a JSON object"),
        (json.dumps([_ent(), {"Label": "x"}]), "TitleEntities[1]: expected keys"),
        (json.dumps([_ent(Label=3)]), "TitleEntities[0].Label: expected a string"),
        (json.dumps([_ent(Confidence="high")]), "Confidence: expected a number"),
        (json.dumps([_ent(Confidence=True)]), "Confidence: expected a number"),
        (json.dumps([_ent(OccurrenceOffsets=[1.5])]), "OccurrenceOffsets: expected a list of"),
        (json.dumps([_ent(OccurrenceOffsets=3)]), "OccurrenceOffsets: expected a list of"),
        (json.dumps([_ent(SurfaceForms=["a", 1])]), "SurfaceForms: expected a list of strings"),
    ],
)
def test_bad_entity_json(tmp_path, ents, expect):
    p = _write(tmp_path, "news.tsv", [GOOD_NEWS, f"N2\tc\ts\tt\ta\tu\t{ents}\t[]"])
    with pytest.raises(DataError) as ei:
        read_news(p)
    assert str(ei.value).startswith(f"{p}:2: ")
    assert expect in str(ei.value)


def test_bad_news_columns_and_duplicates(tmp_path):
    p = _write(tmp_path, "news.tsv", [GOOD_NEWS, "N2\tc\ts\tt\ta"])
    with pytest.raises(DataError) as ei:
        read_news(p)
    assert str(ei.value) == f"{p}:2: expected 8 tab-separated columns, got 5"
    q = _write(tmp_path, "news2.tsv", [GOOD_NEWS, "N3\tc\ts\tt\ta\tu\t\t", GOOD_NEWS])
    with pytest.raises(DataError) as ei:
        read_news(q)
    assert str(ei.value) == f"{q}:3: expected unique NewsID, 'N1' already on line 1"


def test_split_dir(tmp_path):
    (tmp_path / "plain" / "train").mkdir(parents=True)
    (tmp_path / "ms" / "MINDsmall_dev").mkdir(parents=True)
    (tmp_path / "ml" / "MINDlarge_test").mkdir(parents=True)
    assert split_dir(tmp_path / "plain", "train") == tmp_path / "plain" / "train"
    assert split_dir(tmp_path / "ms", "dev") == tmp_path / "ms" / "MINDsmall_dev"
    assert split_dir(tmp_path / "ml", "test") == tmp_path / "ml" / "MINDlarge_test"
    with pytest.raises(FileNotFoundError) as ei:
        split_dir(tmp_path / "ms", "train")
    assert f"{tmp_path / 'ms' / 'train'}" in str(ei.value) and "MIND*_train" in str(ei.value)
    with pytest.raises(ValueError, match="expected one of"):
        split_dir(tmp_path, "valid")


def test_parse_time_agrees_with_strptime_on_edge_fields():
    """Every combination of edge field values: same datetime or both raise ValueError."""
    import itertools

    fields = itertools.product(
        ["0", "1", "02", "12", "13"],  # month
        ["0", "1", "29", "30", "31"],  # day
        ["2019", "2020", "19"],  # year
        ["0", "1", "09", "12", "13"],  # hour
        ["0", "5", "59", "60"],  # minute
        ["00", "7"],  # second
        ["AM", "PM", "am", "XM"],
    )
    n = 0
    for mo, d, y, h, mi, s, p in fields:
        text = f"{mo}/{d}/{y} {h}:{mi}:{s} {p}"
        try:
            want = dt.datetime.strptime(text, "%m/%d/%Y %I:%M:%S %p")
        except ValueError:
            with pytest.raises(ValueError):
                parse_time(text)
        else:
            assert parse_time(text) == want, text
            n += 1
    assert n > 1000  # the comparison really covered many valid strings
