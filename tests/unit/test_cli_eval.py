"""``mtrec evaluate`` / ``mtrec predict`` hand their ``eval.*`` overrides (e.g. eval.device=cpu)
to the evaluator exactly as typed, and an ensemble's runs in order."""

from __future__ import annotations

import pytest

from mtrec_dist import cli
from mtrec_dist.eval import evaluate as evaluate_mod
from mtrec_dist.eval import predict as predict_mod


@pytest.mark.parametrize("cmd", ["evaluate", "predict"])
def test_overrides_reach_the_evaluator(monkeypatch, cmd):
    seen: dict = {}

    def record(runs, **kw):
        seen.update(kw, runs=runs)
        return {} if cmd == "evaluate" else "prediction.zip"

    monkeypatch.setattr(evaluate_mod, "evaluate", record)
    monkeypatch.setattr(predict_mod, "predict", record)
    argv = [cmd, "--run", "A", "--run", "B", "--workers", "3", "eval.device=cpu", "eval.bf16=true"]
    a = cli.build_parser().parse_args(argv)
    assert a.fn(a) == 0
    assert seen["runs"] == ["A", "B"] and seen["num_workers"] == 3
    assert seen["overrides"] == ["eval.device=cpu", "eval.bf16=true"]
    assert seen["split"] == ("dev" if cmd == "evaluate" else "test")
