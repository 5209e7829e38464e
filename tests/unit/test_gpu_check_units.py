"""bench/gpu_check.py's pure parts: the peak table by device name, the arithmetic of TFLOP/s and
the epoch projection, relative differences, the analytic BERT count and the printed table."""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from gpu_check import (  # noqa: E402
    MIND_LARGE_TRAIN_IMPRESSIONS,
    Check,
    SectionTimeout,
    achieved,
    bert_forward_flops,
    counting_flops,
    epoch_hours,
    format_table,
    match_peak,
    rel_diff,
    table_rows,
    time_limit,
)


@pytest.mark.parametrize(
    "name, label, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200", 989.4),
        ("NVIDIA H200 NVL", "H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
    ],
)
def test_peak_matched_by_device_name(name, label, tflops):
    assert match_peak(name) == {"device": label, "bf16_dense_tflops": tflops}


@pytest.mark.parametrize("name", [None, "", "Tesla V100-SXM2-32GB", "NVIDIA L4"])
def test_unknown_or_no_device_has_no_peak(name):
    assert match_peak(name) is None


def test_achieved_tflops_and_fraction_by_hand():
    # 3.0e15 FLOPs in 10 s = 300 TFLOP/s; of a 989.4 peak: 0.30321...
    got = achieved(3.0e15, 10.0, 989.4)
    assert got["tflops"] == pytest.approx(300.0, rel=1e-12)
    assert got["fraction_of_peak"] == pytest.approx(300.0 / 989.4, rel=1e-12)
    assert achieved(3.0e15, 10.0, None) == {
        "tflops": pytest.approx(300.0),
        "fraction_of_peak": None,
    }


def test_epoch_projection_by_hand():
    assert MIND_LARGE_TRAIN_IMPRESSIONS == 2_232_748
    # 2,232,748 samples at 620.2078 samples/s = 3600.0 s = exactly one hour
    assert epoch_hours(2_232_748, 2_232_748 / 3600) == pytest.approx(1.0, rel=1e-15)
    assert epoch_hours(7200, 1.0) == 2.0


def test_rel_diff_is_the_norm_ratio():
    b = torch.tensor([3.0, 4.0])  # ||b|| = 5
    a = torch.tensor([3.0, 4.5])  # ||a - b|| = 0.5
    assert rel_diff(a, b) == pytest.approx(0.1, rel=1e-15)
    assert rel_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    assert math.isinf(rel_diff(torch.ones(3), torch.zeros(3)))


def test_analytic_bert_count_matches_the_flop_counter():
    """The formula against torch's own counter on a small random BERT (the counter that the
    check uses for whole steps)."""
    from transformers import BertConfig, BertModel

    h, n_layers, inter, u, length = 16, 2, 40, 5, 7
    bert = BertModel(
        BertConfig(
            vocab_size=100, hidden_size=h, num_hidden_layers=n_layers, num_attention_heads=2,
            intermediate_size=inter, max_position_embeddings=32,
        ),
        add_pooling_layer=False,
    ).eval()  # fmt: skip
    ids = torch.randint(1, 100, (u, length))
    mask = torch.ones(u, length, dtype=torch.long)
    mask[:, 5:] = 0
    with torch.no_grad(), counting_flops() as fc:
        bert(input_ids=ids, attention_mask=mask)
    # by hand: per layer 8*5*7*16^2 + 4*5*7^2*16 + 4*5*7*16*40 = 71680 + 15680 + 89600
    assert bert_forward_flops(u, length, h, n_layers, inter) == 2 * (71680 + 15680 + 89600)
    assert fc.get_total_flops() == bert_forward_flops(u, length, h, n_layers, inter)


def _result():
    run = {
        "samples_per_s": 100.0,
        "titles_per_s": 2000.0,
        "tflops": 123.4,
        "fraction_of_peak": 0.125,
        "peak_mem_mb": 2048.0,
    }
    return {
        "sections": {
            "environment": {"ok": True, "torch": "2.9", "gpu": "NVIDIA H100 80GB HBM3",
                            "peak": {"device": "H100 SXM", "bf16_dense_tflops": 989.4}},
            "steps": {
                "ok": True,
                "runs": {"mtrec_micro32": run},
                "ratios": {"32": {"mtrec_over_bert": 1.7, "surgery_share": 0.02}},
            },
            "zero2_vs_zero3": {"ok": False, "error": "SectionTimeout: over its time budget"},
            "fp32_cuda_vs_cpu": {"ok": True, "max_rel_diff": 3e-7, "pass": True},
            "projection": {
                "ok": True,
                "from": {"ray_train": {"hours_per_epoch": 1.5, "hours_per_epoch_clicks": 1.65}},
            },
        }
    }  # fmt: skip


def test_table_rows_read_the_json():
    rows = table_rows(_result())
    assert ("environment", "gpu", "NVIDIA H100 80GB HBM3") in rows
    assert ("environment", "bf16 dense peak TFLOP/s", "989.4") in rows
    assert ("environment", "cuda", "-") in rows  # absent -> "-"
    assert (
        "steps",
        "mtrec_micro32",
        "100 samples/s, 2000 titles/s, 123.4 TFLOP/s (0.125 of peak), peak mem 2048 MB",
    ) in rows
    assert ("steps", "micro 32", "MTRec/BERT step 1.7, surgery share 0.02") in rows
    assert ("zero2_vs_zero3", "FAILED", "SectionTimeout: over its time budget") in rows
    assert ("fp32_cuda_vs_cpu", "max relative difference", "3e-07") in rows
    assert ("fp32_cuda_vs_cpu", "pass (<= 1e-05)", "yes") in rows
    assert ("projection", "ray_train", "1.5 h/epoch (impressions), 1.65 h/epoch (clicks)") in rows
    assert not any(r[0] in ("ray_train", "evaluator") for r in rows)  # absent sections: no rows


def test_format_table_aligns_columns():
    text = format_table(_result())
    lines = text.splitlines()
    assert len(lines) == len(table_rows(_result()))
    w0 = max(len(r[0]) for r in table_rows(_result()))
    w1 = max(len(r[1]) for r in table_rows(_result()))
    for line, (a, b, c) in zip(lines, table_rows(_result())):
        assert line == f"{a:<{w0}}  {b:<{w1}}  {c}"
    assert format_table({"sections": {}}) == ""


def _check(tmp_path, budget=30.0):
    ns = argparse.Namespace(smoke=True, budget=budget, out=str(tmp_path / "out.json"))
    return Check(ns, tmp_path)


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path):
    ck = _check(tmp_path)

    def bad(out, deadline):
        out["partial"] = 1
        raise ValueError("boom")

    def good(out, deadline):
        out["x"] = 2

    ck.section("a", 10, bad)
    ck.section("b", 10, good)
    saved = json.loads((tmp_path / "out.json").read_text())
    a, b = saved["sections"]["a"], saved["sections"]["b"]
    assert not a["ok"] and a["error"] == "ValueError: boom" and a["partial"] == 1
    assert "ValueError" in a["traceback"]
    assert b["ok"] and b["x"] == 2 and b["budget_s"] == 10


def test_a_section_past_its_budget_is_stopped(tmp_path):
    ck = _check(tmp_path)

    def slow(out, deadline):
        out["deadline_before_budget"] = deadline < time.monotonic() + 0.5
        time.sleep(5)
        out["slept_to_the_end"] = True  # never reached: the budget interrupts the sleep

    rec = ck.section("slow", 0.5, slow)
    assert "slept_to_the_end" not in rec
    assert not rec["ok"] and rec["error"].startswith("SectionTimeout: over its time budget")
    assert rec["deadline_before_budget"]  # the soft deadline is 80% of the budget


def test_no_overall_time_left_skips_a_section_unless_always(tmp_path):
    ck = _check(tmp_path, budget=0.5)
    time.sleep(0.6)
    ran = []
    skipped = ck.section("late", 10, lambda out, d: ran.append(1))
    assert not skipped["ok"] and "no time left" in skipped["error"] and ran == []
    forced = ck.section("arith", 5, lambda out, d: ran.append(2), always=True)
    assert forced["ok"] and ran == [2]


def test_time_limit_disarms_after_the_block():
    with time_limit(0.3):
        pass
    time.sleep(0.5)  # no late alarm
    with pytest.raises(SectionTimeout):
        with time_limit(0.2):
            time.sleep(2)
