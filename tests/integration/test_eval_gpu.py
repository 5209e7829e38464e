"""The evaluator on CUDA (docs/design.md §8.5): fp32 ranks on the GPU equal the CPU's, the
trainer's in-memory evaluation follows its model onto the GPU, one Ray actor per GPU, and the
bf16 option stays within its rounding bound. Every test needs CUDA (``@pytest.mark.gpu``:
reported as skipped, with the reason, on a machine without)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrec_dist.eval.engine import Engine
from mtrec_dist.eval.evaluate import evaluate, evaluate_model
from mtrec_dist.eval.pool import WorkerPool
from mtrec_dist.eval.predict import predict
from mtrec_dist.eval.run_folder import load_run
from tests.integration.test_predict import copy_run
from tests.integration.test_predict import data as data  # noqa: F401  (the shared fixture)
from tests.integration.test_prediction_golden import GOLDEN, MODELS, SEED, _lines, _run
from tests.unit.test_eval_device import BF16_EPS, _scores
from tests.unit.test_eval_device import run as run  # noqa: F401  (fixtures)
from tests.unit.test_eval_device import scaled_run as scaled_run  # noqa: F401

pytestmark = pytest.mark.gpu
CUDA = ["eval.device=cuda"]


@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_ranks_on_cuda_equal_the_cpu_ranks(data, name):
    """The golden runs (every impression's distinct scores at least 1e-5 apart, relative, on
    the CPU; an exact tie is the same news twice) predicted on the GPU: the prediction file
    is the CPU's, byte for byte, and the committed golden's. Covers the factored scorer
    (mtrec), the batched bi-encoder path (miner, nrms) and the cross-encoder (unbert)."""
    cpu_run = _golden_run(data, name)
    gpu_run = copy_run(cpu_run, cpu_run.name + "-cuda")
    cpu = predict(cpu_run, "test", out=cpu_run / "cpu.zip", num_workers=1)
    gpu = predict(gpu_run, "test", out=gpu_run / "cuda.zip", num_workers=1, overrides=CUDA)
    got, want = _lines(gpu), _lines(cpu)
    diff = [(g, w) for g, w in zip(got, want) if g != w]
    assert len(got) == len(want) and not diff, f"{len(diff)} impressions differ: {diff[:3]}"
    assert gpu.read_bytes() == cpu.read_bytes() == (GOLDEN / f"{name}_test.zip").read_bytes()
    rec = (gpu_run / "eval/test/prediction.json").read_text()
    assert '"device": "cuda"' in rec
    # the scores themselves: float32 rounding apart (other kernels, other summation order),
    # measured against each impression's largest magnitude, as the goldens' margin is
    g, c = _scores(gpu_run, "test"), _scores(cpu_run, "test")
    sizes = np.concatenate(
        [np.load(p)["sizes"] for p in sorted((cpu_run / "eval/test/parts").glob("*.npz"))]
    )
    scale = np.repeat(
        [max(1.0, float(np.abs(s).max())) for s in np.split(c, np.cumsum(sizes)[:-1])], sizes
    )
    assert np.max(np.abs(g - c) / scale) < 1e-4


@pytest.mark.parametrize("name", ["mtrec", "nrms"])
def test_trainer_evaluation_runs_on_its_models_gpu(data, name):
    """``evaluate_model`` (the trainer's periodic dev metrics) on a model moved to the GPU
    computes there and reports the CPU's metrics exactly (the same ranks; metrics are
    functions of the ranks). The golden runs keep their margin on dev too: distinct scores of
    an impression at least 3e-5 apart, relative, on the CPU (measured for both models)."""
    model, cfg, *_ = load_run(_golden_run(data, name))
    cpu = evaluate_model(model, cfg.prepared_dir, "dev")
    model.to("cuda")
    eng = Engine(model, cfg.prepared_dir, "dev")
    assert eng.device.type == "cuda"
    gpu = evaluate_model(model, cfg.prepared_dir, "dev")
    assert gpu == cpu
    assert next(model.parameters()).device.type == "cuda"  # left where the trainer had it


def _golden_run(data, name: str) -> Path:
    """The golden run of ``name`` (its seed), built once per module."""
    seed = SEED.get(name, 0)
    run = data[0] / f"golden-{name}-{seed}"
    return run if run.is_dir() else _run(data, name, seed=seed)


def _where(engine: Engine) -> tuple[str, str]:
    """An actor's device and the GPUs Ray let it see."""
    return str(engine.device), os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_one_actor_per_gpu(data):
    """On ``cuda`` the pool asks Ray for one GPU per actor: each of the node's GPUs gets one
    actor, which sees that GPU alone (as ``cuda:0``) and holds its model there; and
    ``evaluate`` takes one worker per GPU (one GPU: the engine in this process)."""
    run = _golden_run(data, "mtrec")
    n = torch.cuda.device_count()
    res = evaluate(copy_run(run, "gpu-workers"), "dev", num_workers=8, overrides=CUDA)
    assert res["device"] == "cuda" and res["workers"] == min(n, res["parts"])
    pool = WorkerPool(n, Path(run), "dev", lambda: None, device="cuda")
    try:
        pool.actors, pool.started = pool._start_actors(), True
        seen = pool._each(_where)
    finally:
        pool.close()
    assert len(seen) == n
    assert {d for d, _ in seen} == {"cuda:0"}
    visible = sorted(v for _, v in seen)
    assert all("," not in v for v in visible) and len(set(visible)) == n


def test_bf16_on_cuda_within_the_rounding_bound(scaled_run):
    """``eval.bf16=true`` on the GPU: other scores than fp32 (autocast is on), each within
    the bound of tests/unit/test_eval_device.py (``scale * R**2 * eps * (2 + eps)``)."""
    ref = evaluate(scaled_run, "dev", num_workers=1, overrides=CUDA)
    ref_scores = _scores(scaled_run)
    (vec_path,) = [
        p for p in (scaled_run / "eval/dev").glob("news_vectors-*.npy") if "bf16" not in p.name
    ]
    half = evaluate(scaled_run, "dev", num_workers=1, overrides=[*CUDA, "eval.bf16=true"])
    assert half["device"] == "cuda" and half["bf16"] is True
    assert half["news_encoded"] == ref["news_needed"]
    model, *_ = load_run(scaled_run)
    r = np.load(vec_path)
    bound = model.score_scale * np.max(np.sum(r * r, axis=1)) * BF16_EPS * (2 + BF16_EPS)
    diff = np.abs(_scores(scaled_run) - ref_scores)
    assert 0 < diff.max() <= bound, (diff.max(), bound)
