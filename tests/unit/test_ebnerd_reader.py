"""EBNeRD reader: tiny parquet files built with pyarrow -> exact News/Impression records."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtrec_dist.data.ebnerd import iter_behaviors, read_articles, split_dir
from mtrec_dist.data.tables import DataError, Entity, Impression, News, ReadStats

T = dt.datetime


def _articles(root):
    table = pa.table(
        {
            "article_id": pa.array([3001, 3002, 3003], pa.int32()),
            "title": ["Mette Frederiksen besøger Aarhus", "Ingen navne", "Øl i Aarhus og Aarhus"],
            "subtitle": ["Sub 1", None, "Sub 3"],
            "category": pa.array([118, 142, 118], pa.int16()),
            "category_str": ["nyheder", "sport", "nyheder"],
            "subcategory": pa.array([[133, 7], [], None], pa.list_(pa.int16())),
            "sentiment_label": ["Negative", "neutral", None],
            "sentiment_score": [0.9, 0.5, None],
            "ner_clusters": [["Mette Frederiksen", "Aarhus", "København"], [], ["Aarhus"]],
            "entity_groups": [["PER", "LOC", "LOC"], [], ["LOC"]],
            "published_time": pa.array([T(2023, 1, 1)] * 3, pa.timestamp("us")),
        }
    )
    pq.write_table(table, root / "articles.parquet")
    return root / "articles.parquet"


def test_read_articles_exact(tmp_path):
    stats = ReadStats()
    news = read_articles(_articles(tmp_path), stats)
    assert news == [
        News(
            "3001",
            "nyheder",
            "133",
            "Mette Frederiksen besøger Aarhus",
            "Sub 1",
            "",
            [
                Entity("Mette Frederiksen", "PER", "", 1.0, [0], ["Mette Frederiksen"]),
                Entity("Aarhus", "LOC", "", 1.0, [26], ["Aarhus"]),
                Entity("København", "LOC", "", 1.0, [], ["København"]),
            ],
            [],
            sentiment=0,
        ),
        News("3002", "sport", "", "Ingen navne", "", "", [], [], sentiment=1),
        News(
            "3003",
            "nyheder",
            "",
            "Øl i Aarhus og Aarhus",
            "Sub 3",
            "",
            [Entity("Aarhus", "LOC", "", 1.0, [5], ["Aarhus"])],
            [],
            sentiment=-1,
        ),
    ]
    # Offsets are the first exact occurrence, computed independently with str.index.
    assert news[0].title.index("Aarhus") == 26 and news[2].title.index("Aarhus") == 5
    assert stats["news"] == 3


def test_sentiment_mapping_case_insensitive_and_unknown(tmp_path):
    labels = ["POSITIVE", "Neutral", "negative", "Mixed", None]
    pq.write_table(
        pa.table(
            {
                "article_id": list(range(5)),
                "title": ["t"] * 5,
                "category_str": ["c"] * 5,
                "sentiment_label": labels,
            }
        ),
        tmp_path / "a.parquet",
    )
    stats = ReadStats()
    assert [n.sentiment for n in read_articles(tmp_path / "a.parquet", stats)] == [2, 1, 0, -1, -1]
    assert stats["unknown_sentiment_label"] == 1


def test_articles_missing_column_and_duplicate(tmp_path):
    pq.write_table(pa.table({"article_id": [1], "title": ["t"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError) as ei:
        read_articles(tmp_path / "a.parquet")
    assert str(ei.value).startswith(f"{tmp_path / 'a.parquet'}: expected column 'category_str'")
    pq.write_table(
        pa.table({"article_id": [1, 2, 1], "title": ["t"] * 3, "category_str": ["c"] * 3}),
        tmp_path / "d.parquet",
    )
    with pytest.raises(DataError) as ei:
        read_articles(tmp_path / "d.parquet")
    assert (
        str(ei.value)
        == f"{tmp_path / 'd.parquet'}:3: expected unique article_id, 1 already in row 1"
    )


def _split(folder, with_clicks: bool | None):
    """with_clicks: True = labeled, False = clicks column of empty lists, None = no column."""
    folder.mkdir(parents=True)
    beh = {
        "impression_id": pa.array([11, 12, 13], pa.uint32()),
        "article_id": pa.array([None, 3001, None], pa.int32()),
        "impression_time": pa.array(
            [T(2023, 5, 20, 8, 0, 1), T(2023, 5, 21, 9, 30), T(2023, 5, 22, 23, 59, 59)],
            pa.timestamp("us"),
        ),
        "article_ids_inview": pa.array(
            [[3001, 3002, 3003], [3003, 3001], [3002]], pa.list_(pa.int32())
        ),
        "user_id": pa.array([7, 8, 9], pa.uint32()),
    }
    if with_clicks is True:
        beh["article_ids_clicked"] = pa.array([[3002], [3003, 3001], [3002]], pa.list_(pa.int32()))
    elif with_clicks is False:
        beh["article_ids_clicked"] = pa.array([[], [], []], pa.list_(pa.int32()))
    pq.write_table(pa.table(beh), folder / "behaviors.parquet", row_group_size=2)
    hist = {
        "user_id": pa.array([8, 7], pa.uint32()),
        # Times deliberately out of order; ids must come back oldest first.
        "impression_time_fixed": pa.array(
            [
                [T(2023, 5, 1, 12), T(2023, 4, 30, 9), T(2023, 5, 2, 7)],
                [T(2023, 5, 3), T(2023, 5, 1), T(2023, 5, 3), T(2023, 4, 1)],
            ],
            pa.list_(pa.timestamp("us")),
        ),
        "article_id_fixed": pa.array(
            [[2001, 2002, 2003], [2010, 2011, 2012, 2013]], pa.list_(pa.int32())
        ),
    }
    pq.write_table(pa.table(hist), folder / "history.parquet")


def test_behaviors_labeled_with_history_order(tmp_path):
    _split(tmp_path / "train", True)
    stats = ReadStats()
    imps = list(iter_behaviors(split_dir(tmp_path, "train"), stats))
    assert imps == [
        Impression(
            "11",
            "7",
            T(2023, 5, 20, 8, 0, 1),
            ["2013", "2011", "2010", "2012"],  # ties (2010, 2012) keep file order
            ["3001", "3002", "3003"],
            [0, 1, 0],
        ),
        Impression(
            "12", "8", T(2023, 5, 21, 9, 30), ["2002", "2001", "2003"], ["3003", "3001"], [1, 1]
        ),
        Impression("13", "9", T(2023, 5, 22, 23, 59, 59), [], ["3002"], [1]),
    ]
    assert stats["impressions"] == 3
    assert stats["empty_history"] == 1 and stats["missing_history_user"] == 1


@pytest.mark.parametrize("with_clicks", [None, False])
def test_test_split_without_clicks(tmp_path, with_clicks):
    _split(tmp_path / "test", with_clicks)
    imps = list(iter_behaviors(split_dir(tmp_path, "test")))
    assert [i.labels for i in imps] == [None, None, None]
    assert [i.candidates for i in imps] == [["3001", "3002", "3003"], ["3003", "3001"], ["3002"]]
    assert imps[1].history == ["2002", "2001", "2003"]


def test_split_dir_and_missing_columns(tmp_path):
    _split(tmp_path / "validation", True)
    assert split_dir(tmp_path, "dev") == tmp_path / "validation"
    with pytest.raises(FileNotFoundError, match="looked for .*train"):
        split_dir(tmp_path, "train")
    folder = tmp_path / "validation"
    t = pq.read_table(folder / "behaviors.parquet").drop_columns(["article_ids_inview"])
    pq.write_table(t, folder / "behaviors.parquet")
    with pytest.raises(DataError) as ei:
        list(iter_behaviors(folder))
    assert str(ei.value).startswith(
        f"{folder / 'behaviors.parquet'}: expected column 'article_ids_inview'"
    )
    h = pq.read_table(folder / "history.parquet").drop_columns(["impression_time_fixed"])
    pq.write_table(h, folder / "history.parquet")
    _split(tmp_path / "x", True)
    pq.write_table(h, tmp_path / "x" / "history.parquet")
    with pytest.raises(DataError) as ei:
        list(iter_behaviors(tmp_path / "x"))
    assert str(ei.value).startswith(
        f"{tmp_path / 'x' / 'history.parquet'}: expected column 'impression_time_fixed'"
    )


def test_empty_articles_or_behaviors_is_an_error(tmp_path):
    """No rows is an error naming the file, not 0 news / a split of 0 impressions."""
    path = _articles(tmp_path)
    pq.write_table(pq.read_table(path).slice(0, 0), path)
    with pytest.raises(DataError) as ei:
        read_articles(path)
    assert str(ei.value) == f"{path}: no rows: expected one row per article"
    _split(tmp_path / "train", True)
    beh = tmp_path / "train" / "behaviors.parquet"
    pq.write_table(pq.read_table(beh).slice(0, 0), beh)
    with pytest.raises(DataError) as ei:
        list(iter_behaviors(tmp_path / "train"))
    assert str(ei.value) == f"{beh}: no rows: expected one row per impression"
