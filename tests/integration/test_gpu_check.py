"""bench/gpu_check.py --smoke on CPU, as a subprocess: every section present and ok, and its
figures recomputed here another way (so the prepared GPU check cannot rot before a GPU exists).

What it cannot show on CPU: the CUDA-only numbers (peak memory, fraction of the bf16 peak, the
CUDA side of the fp32 comparison) are null or CPU-vs-CPU here by design.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch

from mtrec_dist import hub
from mtrec_dist.data.synthetic import SCALES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]
SECTIONS = (
    "environment",
    "steps",
    "zero2_vs_zero3",
    "ray_train",
    "evaluator",
    "fp32_cuda_vs_cpu",
    "projection",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out),
         "--work", str(tmp)],
        cwd=str(REPO), capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_section_present_and_ok(smoke):
    res, _ = smoke
    assert res["mode"] == "smoke" and res["device"] == "cpu"
    assert res["setup"]["ok"], res["setup"].get("error")
    assert list(res["sections"]) == list(SECTIONS)
    for name in SECTIONS:
        assert res["sections"][name]["ok"], (name, res["sections"][name].get("error"))


def test_the_table_names_every_section(smoke):
    res, stdout = smoke
    for name in SECTIONS:
        assert any(line.startswith(name) for line in stdout.splitlines()), name
    assert "FAILED" not in stdout


def test_environment_matches_this_process(smoke):
    env = smoke[0]["sections"]["environment"]
    assert env["torch"] == torch.__version__
    assert env["deepspeed"] == deepspeed.__version__
    if not torch.cuda.is_available():  # --smoke on a GPU node still names its GPU
        assert env["gpu"] is None and env["peak"] is None and env["nccl"] is None


def test_tiny_encoder_forward_flops_equal_the_analytic_count(smoke):
    setup = smoke[0]["setup"]
    f = smoke[0]["sections"]["steps"]["encoder_forward_flops"]
    h, n_layers, inter = hub.TINY["hidden_size"], hub.TINY["num_hidden_layers"], 64
    assert (f["hidden"], f["layers"], f["intermediate"]) == (h, n_layers, inter)
    assert setup["encoder_config"]["hidden"] == h
    u, length = f["titles"], f["length"]
    assert length <= 30  # data.title_len=30: the batch's padded width is at most that
    # per layer: Q,K,V,O projections 4 x 2 U L H^2; scores and weights x V 2 x 2 U L^2 H;
    # feed-forward 2 x 2 U L H I
    per_layer = (
        4 * 2 * u * length * h * h + 2 * 2 * u * length**2 * h + 2 * 2 * u * length * h * inter
    )
    assert f["counted"] == n_layers * per_layer


def test_step_figures_recomputed(smoke):
    steps = smoke[0]["sections"]["steps"]
    assert set(steps["runs"]) == {"bert_micro8", "mtrec_micro8", "bert_micro16", "mtrec_micro16"}
    for key, r in steps["runs"].items():
        assert key == f"{r['model']}_micro{r['micro_batch']}"
        assert r["precision"] == "bf16" and r["zero_stage"] == 2
        assert r["timed_steps"] == 1 and len(r["flops_per_batch"]) == 1
        n = len(r["flops_per_batch"])
        assert r["counted_flops"] == sum(
            r["flops_per_batch"][i % n] for i in range(r["timed_steps"])
        )
        assert r["tflops"] == pytest.approx(
            r["counted_flops"] / r["wall_s_total"] / 1e12, rel=1e-12
        )
        assert r["fraction_of_peak"] is None and r["peak_mem_mb"] is None  # CPU: no peak
        assert r["samples_per_s"] == pytest.approx(r["samples"] / r["wall_s_total"], rel=1e-12)
        assert r["titles_per_s"] == pytest.approx(r["titles"] / r["wall_s_total"], rel=1e-12)
        assert r["samples"] == r["micro_batch"]  # the stream's first batch is full
        assert r["surgery_share"] == pytest.approx(r["surgery_s_total"] / r["wall_s_total"])
        if r["model"] == "bert":
            assert r["groups"] == ["main"] and r["surgery"] == "none"
        else:
            assert r["groups"] == ["main", "aux"] and r["surgery"] == "mtrec"
    for m in ("8", "16"):
        b, t = steps["runs"][f"bert_micro{m}"], steps["runs"][f"mtrec_micro{m}"]
        # the MTRec step does the BERT step's work and more: one encoder forward, two backwards
        assert t["flops_per_batch"][0] > b["flops_per_batch"][0]
        want = (t["wall_s_total"] / t["timed_steps"]) / (b["wall_s_total"] / b["timed_steps"])
        assert steps["ratios"][m]["mtrec_over_bert"] == pytest.approx(want, rel=1e-12)
        assert steps["ratios"][m]["surgery_share"] == t["surgery_share"]


def test_zero_stages(smoke):
    z = smoke[0]["sections"]["zero2_vs_zero3"]
    assert z["zero2"]["zero_stage"] == 2 and z["zero3"]["zero_stage"] == 3
    assert z["zero2_peak_mem_mb"] is None and z["zero3_over_zero2"] is None  # CPU


def test_ray_train_log(smoke):
    r = smoke[0]["sections"]["ray_train"]
    assert r["exit_code"] == 0 and r["steps"] == r["steps_asked"] == 2
    assert r["backend"] == "gloo"
    assert r["startup_s"] > 0 and r["steps_s"] > 0
    assert r["startup_s"] + r["steps_s"] == pytest.approx(r["run_wall_s"], rel=1e-9)
    assert "trainer.max_steps=2" in r["command"] and "trainer.num_workers=1" in r["command"]


def test_evaluator_rates_recomputed(smoke):
    e = smoke[0]["sections"]["evaluator"]
    assert set(e["runs"]) == {"fp32"}  # bf16 only on CUDA
    r = e["runs"]["fp32"]
    # the dev split's first shard: data.impressions_per_shard=100 of the tiny scale's 100
    assert r["impressions"] == min(100, SCALES["tiny"].dev)
    assert r["titles_per_s"] == pytest.approx(r["news_encoded"] / r["encode_s"], rel=1e-12)
    assert r["impressions_per_s"] == pytest.approx(r["impressions"] / r["score_s"], rel=1e-12)
    assert 0.0 <= r["auc"] <= 1.0
    assert r["device_asked"] == r["device_reported"] == "cpu"


def test_fp32_step_cpu_against_cpu_is_exact(smoke):
    f = smoke[0]["sections"]["fp32_cuda_vs_cpu"]
    assert f["compared"] == "cpu vs cpu"
    assert f["grad_sets_equal"] and f["pass"]
    # the same step twice in one process, one thread: bit-identical
    assert f["max_rel_diff"] == 0.0
    assert set(f["losses"]) == {"main", "category", "ner"}


def test_projection_recomputed(smoke):
    res = smoke[0]
    p = res["sections"]["projection"]
    setup = res["setup"]
    assert p["impressions"] == SCALES["large"].train == 2_232_748
    assert setup["clicks_per_impression"] == setup["train_clicks"] / setup["train_impressions"]
    assert p["clicks"] == pytest.approx(2_232_748 * setup["clicks_per_impression"], rel=1e-12)
    sps = {
        "steps_mtrec_micro16": res["sections"]["steps"]["runs"]["mtrec_micro16"]["samples_per_s"],
        "ray_train": res["sections"]["ray_train"]["samples_per_s"],
    }
    assert set(p["from"]) == set(sps)
    for key, v in sps.items():
        assert p["from"][key]["samples_per_s"] == v
        assert p["from"][key]["hours_per_epoch"] == pytest.approx(2_232_748 / v / 3600, rel=1e-12)
        assert p["from"][key]["hours_per_epoch_clicks"] == pytest.approx(
            p["clicks"] / v / 3600, rel=1e-12
        )
