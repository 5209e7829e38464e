"""bench/bench_dedup_step.py's summary: totals over ranks and steps, the slowest rank per step
and the per-rank over global ratios, worked by hand on two ranks and two steps."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_dedup_step import PHASES, summarize  # noqa: E402


def _rank(steps, phases):
    """steps: [(rank cpu, rank wall, rank encoded, global cpu, global wall, global encoded)]."""
    return {
        "steps": [
            {
                "rank": {"cpu_s": rc, "wall_s": rw, "encoded": re, "loss": 1.0},
                "global": {"cpu_s": gc, "wall_s": gw, "encoded": ge, "loss": 1.0},
            }
            for rc, rw, re, gc, gw, ge in steps
        ],
        "phases": {m: dict(zip(PHASES, phases[m])) for m in ("rank", "global")},
    }


def test_summarize_by_hand():
    r0 = _rank(
        [(4.0, 5.0, 100, 3.0, 4.0, 80), (2.0, 3.0, 60, 2.5, 3.5, 70)],
        {"rank": [0, 5, 4, 0.5, 0.5], "global": [0.1, 4, 3, 0.5, 0.4]},
    )
    r1 = _rank(
        [(1.0, 9.0, 50, 3.5, 9.0, 80), (3.0, 9.0, 90, 2.0, 9.0, 70)],
        {"rank": [0, 3, 2, 0.5, 0.5], "global": [0.1, 4, 3, 0.5, 0.4]},
    )
    s = summarize([r0, r1])
    assert s["rank"]["encoded"] == 100 + 60 + 50 + 90
    assert s["global"]["encoded"] == 80 + 70 + 80 + 70
    assert s["rank"]["cpu_s"] == pytest.approx(10.0)
    assert s["global"]["cpu_s"] == pytest.approx(11.0)
    assert s["rank"]["critical_cpu_s"] == pytest.approx(4.0 + 3.0)  # the slowest rank per step
    assert s["global"]["critical_cpu_s"] == pytest.approx(3.5 + 2.5)
    assert s["rank"]["wall_s"] == pytest.approx(5.0 + 3.0)  # rank 0's wall clock
    assert s["rank"]["phases"]["forward"] == pytest.approx(8)
    assert s["global"]["phases"]["exchange"] == pytest.approx(0.2)
    ratios = s["rank_over_global"]
    assert ratios["encoded"] == pytest.approx(300 / 300)
    assert ratios["cpu_s"] == pytest.approx(10 / 11, abs=5e-4)
    assert ratios["critical_cpu_s"] == pytest.approx(7 / 6, abs=5e-4)
    assert ratios["wall_s"] == pytest.approx(8 / 7.5, abs=5e-4)
    assert ratios["encoder_fwd"] == pytest.approx(6 / 6)
    assert s["rank"]["cpu_s_per_step_rank"] == [[4.0, 1.0], [2.0, 3.0]]
