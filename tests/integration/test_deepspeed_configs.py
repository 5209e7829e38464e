"""Every shipped DeepSpeed JSON trains: 2 optimizer steps, 2 CPU workers, tiny BERT.

DeepSpeed 0.19.8 runs all of them on CPU (bf16 included). The offload config runs with
``trainer.surgery=none``: the fused surgery reads gradients in device memory and refuses
offload with any other surgery (tests/integration/test_tune.py records that failure).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_deepspeed_config_trains_two_steps(ray_session, tiny_data, tmp_path, path):
    from mtrec_dist.config import load_config
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.models.registry import build_model
    from mtrec_dist.train.launch import checkpoints_of, run_training

    raw = json.loads(path.read_text())
    offload = "offload_optimizer" in raw.get("zero_optimization", {})
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.root={tiny_data}",
            f"run_dir={tmp_path / 'run'}",
            f"deepspeed={path}",
            "trainer.num_workers=2",
            "trainer.max_steps=2",
            "trainer.checkpoint_every=0",
            "trainer.timeout_s=60",
            *(["trainer.surgery=none"] if offload else []),
        ],
    )
    run_training(cfg)
    run = tmp_path / "run"
    recs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(math.isfinite(r["loss/main"]) for r in recs)
    state = json.loads((checkpoints_of(run)[-1] / "train_state.json").read_text())
    assert state["zero_stage"] == raw["zero_optimization"]["stage"]
    assert state["world_size"] == 2
    # the weights moved away from their initialisation
    torch.manual_seed(cfg.trainer.seed)
    init = build_model(cfg, load_manifest(cfg.prepared_dir)).state_dict()
    got = load_file(str(run / "export" / "model.safetensors"))
    assert max((got[k] - init[k].float()).abs().max().item() for k in init) > 1e-4
