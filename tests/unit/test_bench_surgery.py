"""bench/bench_surgery.py's summary: ratios of summed seconds, surgery share, memory, by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_surgery import summarize  # noqa: E402


def _run(wall, cpu, surgery=0.0, extra=0.0, elems=0.0):
    return {
        "blocks": 4,
        "wall_s_total": wall,
        "cpu_s_total": cpu,
        "wall_s_median": wall / 4,
        "cpu_s_median": cpu / 4,
        "surgery_wall_s_total": surgery,
        "extra_bytes": extra,
        "partition_elems": elems,
    }


def test_summarize_by_hand():
    runs = {
        "bert": [_run(10.0, 8.0), _run(30.0, 8.0)],  # the second repeat on a loaded machine
        "mtrec_one_group": [_run(12.0, 10.0), _run(12.0, 10.0)],
        "mtrec": [_run(18.0, 14.0, 0.2, 400.0, 100.0), _run(22.0, 13.0, 0.2, 400.0, 100.0)],
    }
    s = summarize(runs)
    assert s["mtrec_over_bert"]["cpu"] == pytest.approx(27 / 16)
    assert s["mtrec_over_bert"]["wall"] == pytest.approx(40 / 40)
    per = s["mtrec_over_bert"]["per_repeat"]
    assert [p["cpu_s_total_ratio"] for p in per] == pytest.approx([14 / 8, 13 / 8])
    assert [p["wall_s_total_ratio"] for p in per] == pytest.approx([18 / 10, 22 / 30])
    assert s["mtrec_over_one_group"]["cpu"] == pytest.approx(27 / 20)
    assert s["mtrec_over_one_group"]["wall"] == pytest.approx(40 / 24)
    assert s["totals"]["mtrec"]["blocks"] == 8
    assert s["surgery_share_of_step"] == pytest.approx(0.4 / 40)
    assert s["partition_bytes"] == 400.0  # 100 fp32 elements
    assert s["extra_over_partition"] == 1.0
