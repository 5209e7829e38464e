"""Every shipped DeepSpeed JSON trains: 2 optimizer steps, 2 CPU workers, tiny BERT.

The driver's side runs as ``mtrec train`` runs it (``validate_for_training``: the JSON read,
checked and resolved for 2 workers); the workers run the real per-worker loop
(``train.loop.train_worker``: model, DeepSpeed engine, surgery, checkpoint, export) in two
processes spawned here and joined in one gloo group, every config one after another in the
same spawn, so DeepSpeed's start-up is paid once. Ray Train's orchestration around that loop
is the same for every config and is tested in test_train_ray.py.

DeepSpeed 0.19.8 runs all of them on CPU (bf16 included). The offload config runs with
``trainer.surgery=none``: the fused surgery reads gradients in device memory and refuses
offload with any other surgery (tests/integration/test_tune.py records that failure).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.gloo_workers import free_port, init_gloo_deepspeed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
WORLD = 2


def _config(path: Path, tiny_data: Path, run_dir: Path):
    from mtrec_dist.config import load_config

    raw = json.loads(path.read_text())
    offload = "offload_optimizer" in raw.get("zero_optimization", {})
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.root={tiny_data}",
            f"run_dir={run_dir}",
            f"deepspeed={path}",
            f"trainer.num_workers={WORLD}",
            "trainer.max_steps=2",
            "trainer.checkpoint_every=0",
            "trainer.timeout_s=60",
            *(["trainer.surgery=none"] if offload else []),
        ],
    )


def _worker(rank: int, port: int, jobs: list[dict]) -> None:
    """One Ray Train worker's part, without Ray: the loop asks its context for its ranks."""
    import ray.train

    init_gloo_deepspeed(rank, WORLD, port)
    from mtrec_dist.train.loop import train_worker

    ctx = SimpleNamespace(
        get_world_rank=lambda: rank,
        get_world_size=lambda: WORLD,
        get_local_rank=lambda: rank,
        get_local_world_size=lambda: WORLD,
    )
    ray.train.get_context = lambda: ctx
    for job in jobs:
        train_worker(job)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict[str, Path]:
    from mtrec_dist.train.launch import validate_for_training

    d = tmp_path_factory.mktemp("dsconfigs")
    jobs, runs = [], {}
    for path in CONFIGS:
        cfg = _config(path, tiny_data, d / path.stem)
        _, ds = validate_for_training(cfg)  # the driver's checks and the resolved JSON
        jobs.append({"cfg": cfg.to_dict(), "ds": ds, "run": {"id": path.stem, "resume": False}})
        runs[path.stem] = d / path.stem
    mp.spawn(_worker, args=(free_port(), jobs), nprocs=WORLD, join=True)
    return runs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_deepspeed_config_trains_two_steps(trained, tiny_data, path):
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.models.registry import build_model
    from mtrec_dist.train.launch import checkpoints_of

    raw = json.loads(path.read_text())
    run = trained[path.stem]
    cfg = _config(path, tiny_data, run)
    recs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(math.isfinite(r["loss/main"]) for r in recs)
    state = json.loads((checkpoints_of(run)[-1] / "train_state.json").read_text())
    assert state["zero_stage"] == raw["zero_optimization"]["stage"]
    assert state["world_size"] == WORLD
    # the weights moved away from their initialisation
    torch.manual_seed(cfg.trainer.seed)
    init = build_model(cfg, load_manifest(cfg.prepared_dir)).state_dict()
    got = load_file(str(run / "export" / "model.safetensors"))
    assert max((got[k] - init[k].float()).abs().max().item() for k in init) > 1e-4
