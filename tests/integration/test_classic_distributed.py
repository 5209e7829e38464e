"""The classic baselines train under Ray Train + DeepSpeed exactly like the BERT models and go
through the evaluator: 2 CPU workers under ZeRO-2 end with the single-process reference
trainer's weights (N workers == 1 process on the same global batches), and the evaluator's
metrics equal scoring every dev impression alone with ``model(batch)``.

NAML is a bi-encoder (cached news vectors); NPA's news vectors depend on the user, so it is
scored on the cross-encoder path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.oracles import compute_metrics_lists

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
WORLD, STEPS = 2, 4
SMALL = [
    "model.word_dim=8",
    "model.cnn_filters=6",
    "model.query_dim=5",
    "model.classic_category_dim=4",
    "model.npa_user_dim=3",
    "model.classic_dropout=0.0",  # deterministic forwards: runs compared exactly
    "trainer.surgery=none",
    f"trainer.num_workers={WORLD}",
    f"trainer.max_steps={STEPS}",
    "trainer.checkpoint_every=0",
    "trainer.timeout_s=60",
    "trainer.adam_eps=1e-3",  # as the BERT comparison: near-zero entries must not flip updates
    "data.loader_workers=0",
]


def _reference_weights(cfg) -> dict[str, torch.Tensor]:
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.data.stream import loader_for
    from mtrec_dist.models.registry import build_model, resolve_groups
    from mtrec_dist.train.local import reference_step
    from mtrec_dist.train.optim import build_optimizer, build_scheduler

    t = cfg.trainer
    torch.manual_seed(t.seed)
    model = build_model(cfg, load_manifest(cfg.prepared_dir))
    groups = resolve_groups(cfg, model)
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, STEPS, t.warmup_ratio)
    loaders = [loader_for(cfg, rank=r, world_size=WORLD, epoch=0) for r in range(WORLD)]
    for step, batches in enumerate(zip(*loaders)):
        reference_step(model, list(batches), groups, t.surgery, t.surgery_scope, opt, step=step)
        sched.step()
        if step + 1 == STEPS:
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    raise AssertionError("ran out of batches")


@pytest.mark.parametrize("name", ["naml", "npa"])
def test_classic_model_distributed_equals_reference_and_evaluates(
    ray_session, tiny_data, tmp_path, name
):
    from mtrec_dist.config import load_config
    from mtrec_dist.data.batch import NewsTable, collate
    from mtrec_dist.data.stream import eval_impressions
    from mtrec_dist.eval.evaluate import evaluate
    from mtrec_dist.eval.run_folder import load_run
    from mtrec_dist.train.launch import run_training

    zero2 = tmp_path / "zero2.json"
    zero2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    run = tmp_path / "run"
    args = [f"data.root={tiny_data}", f"run_dir={run}", f"deepspeed={zero2}", *SMALL]
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.name={name}", *args])
    run_training(cfg)
    got = load_file(str(run / "export" / "model.safetensors"))
    ref = _reference_weights(
        load_config(REPO / "configs" / "tiny.yaml", [f"model.name={name}", *args])
    )
    assert set(got) == set(ref)
    worst = max((got[k] - ref[k].float()).abs().max().item() for k in ref)
    assert worst < 1e-4, worst
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.models.registry import build_model

    torch.manual_seed(cfg.trainer.seed)
    init = build_model(cfg, load_manifest(cfg.prepared_dir)).state_dict()
    moved = max((got[k] - init[k].float()).abs().max().item() for k in init)
    assert moved > 100 * worst  # training moved the weights far more than the difference

    metrics = evaluate(run, "dev", num_workers=1)
    model, *_ = load_run(run)
    assert model.cross_encoder == (name == "npa")
    table = NewsTable(cfg.prepared_dir)
    labels, scores = [], []
    with torch.no_grad():
        for s in eval_impressions(cfg.prepared_dir, "dev"):
            labels.append(s.labels)
            sc = model.eval()(collate([s], table)).scores[0].numpy()
            order = sorted(range(len(sc)), key=lambda j: -sc[j])  # stable: the tie rule
            rank = np.empty(len(sc))
            rank[order] = np.arange(1, len(sc) + 1)
            scores.append(-rank)  # the submission's ranks, as the evaluator scores them
    ref_metrics = compute_metrics_lists(labels, scores)
    for k, v in ref_metrics.items():
        assert metrics[k] == pytest.approx(v, abs=1e-6), k
    assert 0.0 <= metrics["auc"] <= 1.0 and np.isfinite(metrics["mrr"])
