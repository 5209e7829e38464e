"""Shared set-up of the spawned gloo + DeepSpeed workers of the distributed equivalence tests
(``test_zero_surgery``, ``test_global_dedup``): one place for the environment, the free port
and the DeepSpeed JSON with the AdamW hyperparameters the single-process references copy."""

from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo_deepspeed(rank: int, world: int, port: int) -> None:
    """This spawned process joins a ``world``-rank gloo group through DeepSpeed (CPU, 1 thread)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed renames
    import deepspeed

    # the shared-memory all-reduce kernel is a JIT C++ build (minutes on a cold CI cache) that
    # only inference all-reduces use: gloo does all the work here
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60), verbose=False)


def ds_config(stage: int, micro: int, gas: int, world: int, adamw: tuple, clip: float) -> dict:
    """DeepSpeed JSON: torch's AdamW with ``adamw`` = (lr, betas, eps, weight decay), ``clip``."""
    lr, betas, eps, wd = adamw
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(betas),
                "eps": eps,
                "weight_decay": wd,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
    }
