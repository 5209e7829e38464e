"""bench/_common.py: the clocks and the counts the benchmarks divide by, against hand counts."""

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtrec_dist.data.batch import NER_IGNORE, Sample, collate

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _common import (  # noqa: E402
    Stopwatch,
    batch_shape,
    distinct_real_titles,
    free_port,
    loader_batches,
    ratio,
    real_slots,
    title_counts,
)


class _Table:
    """News rows 0..9; row r > 0 has a title of r % 4 + 2 word pieces, row 0 is empty."""

    def __init__(self) -> None:
        n, width = 10, 6
        self.tokens = np.zeros((n, width), np.int64)
        for r in range(1, n):
            self.tokens[r, : r % 4 + 2] = 1000 + r
        self.ner = np.full((n, width), NER_IGNORE, np.int64)
        self.category = np.arange(n) % 3
        self.subcategory = np.zeros(n, np.int64)
        self.sentiment = np.zeros(n, np.int64)
        self.entities = np.zeros((n, 2), np.int64)


def _batch(dedup: bool = True, missing_row0: bool = False):
    """3 real samples padded to 4, history 3 (the third history is cut from 4 to 3), C = 3."""
    labels = np.array([1, 0, 0], np.float32)
    samples = [
        Sample("a", np.array([3, 5]), np.array([1, 2, 3]), labels),
        Sample("b", np.array([], np.int64), np.array([4, 1, 0 if missing_row0 else 9]), labels),
        Sample("c", np.array([2, 2, 6, 7]), np.array([5, 6, 8]), labels),
    ]
    return collate(samples, _Table(), batch_size=4, history_len=3, dedup=dedup)


def test_real_slots_leave_out_padding():
    # history 2 + 0 + 3 (cut to the last 3), candidates 3 + 3 + 3; the 4th sample is padding
    assert real_slots(_batch()) == 14
    naive = _batch(dedup=False)
    assert naive.num_titles == 4 * (3 + 3)  # the naive batch encodes padding slots too
    assert real_slots(naive) == 14


def test_distinct_real_titles_and_the_padding_title():
    b = _batch()
    # hist {3, 5, 2, 6, 7} | cand {1, 2, 3, 4, 9, 5, 6, 8} = rows 1..9
    assert distinct_real_titles(b) == 9
    assert b.num_titles == 10  # + row 0 for the padding slots
    assert distinct_real_titles(_batch(dedup=False)) == 9
    # a candidate missing from the news table is row 0 in a real slot: counted once
    b0 = _batch(missing_row0=True)
    assert distinct_real_titles(b0) == 9 and b0.num_titles == 9


def test_batch_shape_by_hand():
    s = batch_shape([_batch(), _batch()])
    # rows 1..9 have 3,4,5,2,3,4,5,2,3 word pieces (31), row 0 none: 31 over 10 titles
    assert s == {
        "batches": 2,
        "real_samples": 6,
        "real_history_per_sample": 10 / 6,
        "real_slots_per_sample": 28 / 6,
        "titles_encoded_per_batch": 10.0,
        "word_pieces_per_title": 62 / 20,
        "padded_width_mean": 5.0,
    }


def test_stopwatch_on_given_clocks():
    wall = iter([0.0, 1.5, 2.0, 2.25, 3.0, 7.0]).__next__
    cpu = iter([10.0, 11.0, 11.0, 11.5, 12.0, 13.0]).__next__
    syncs = []
    sw = Stopwatch(sync=lambda: syncs.append(1), wall=wall, cpu=cpu)
    for _ in range(3):
        with sw:
            pass
    assert sw.wall_s == [1.5, 0.25, 4.0] and sw.cpu_s == [1.0, 0.5, 1.0]
    assert len(syncs) == 6  # before each start and each stop
    assert sw.summary(skip=1) == {
        "blocks": 2,
        "wall_s_total": 4.25,
        "cpu_s_total": 1.5,
        "wall_s_median": 2.125,
        "cpu_s_median": 0.75,
    }
    with pytest.raises(ValueError, match="no timed block after skipping 3"):
        sw.summary(skip=3)


def test_stopwatch_cpu_clock_leaves_out_sleep():
    sw = Stopwatch()
    with sw:
        time.sleep(0.3)  # wall time passes, this process does no work
    assert sw.wall_s[0] >= 0.3
    assert sw.cpu_s[0] < 0.1


def test_ratio_of_totals_and_medians():
    num = {"cpu_s_total": 6.0, "wall_s_total": 9.0, "cpu_s_median": 2.0, "wall_s_median": 3.0}
    den = {"cpu_s_total": 4.0, "wall_s_total": 4.5, "cpu_s_median": 1.0, "wall_s_median": 2.0}
    assert ratio(num, den) == {
        "cpu_s_total_ratio": 1.5,
        "wall_s_total_ratio": 2.0,
        "cpu_s_median_ratio": 2.0,
        "wall_s_median_ratio": 1.5,
    }


def test_loader_batches_are_the_training_stream(tiny_data):
    from mtrec_dist.data.stream import train_loader

    prepared = tiny_data / "prepared"
    got = loader_batches(prepared, batch_size=8, n=3, history_len=10)
    ref = train_loader(
        prepared, rank=0, world_size=1, batch_size=8, epoch=0, seed=0, history_len=10,
        loader_workers=0,
    )  # fmt: skip
    want = [b for _, b in zip(range(3), ref)]
    assert [b.impression_ids for b in got] == [b.impression_ids for b in want]
    assert all(np.array_equal(g.tokens, w.tokens) for g, w in zip(got, want))
    with pytest.raises(ValueError, match=r"gives \d+ batches of 8, 100000 asked"):
        loader_batches(prepared, batch_size=8, n=100_000)


def test_title_counts_by_hand():
    got = title_counts([_batch(), _batch(missing_row0=True)])
    # 14 real slots each; encoded 10 + 9 titles; distinct real 9 + 9
    assert got == {
        "batches": 2,
        "real_samples": 6,
        "real_slots": 28,
        "real_slots_per_sample": 28 / 6,
        "encoded_per_real_slot": 19 / 28,
        "distinct_per_real_slot": 18 / 28,
        "naive_over_encoded": 28 / 19,
    }
    naive = title_counts([_batch(dedup=False)])
    assert naive["encoded_per_real_slot"] == 24 / 14  # padding slots encoded too


def test_free_port_can_be_bound():
    import socket

    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if it were taken
