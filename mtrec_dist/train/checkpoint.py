"""Checkpoints through Ray Train, resume, and the final export.

Every rank saves its DeepSpeed shard into its own temporary folder and reports it with
``ray.train.report``; Ray merges the folders into one checkpoint in storage and registers it
only once every rank has uploaded (so a crash mid-save never leaves a checkpoint that looks
complete), keeping the last ``trainer.keep_checkpoints``. ``engine.save_checkpoint`` and
``ray.train.report`` are collective: every rank calls them the same number of times.

A checkpoint describes itself: ``train_state.json`` holds the position (step, epoch, batches
consumed), the world size and ZeRO stage (a resume must keep both: DeepSpeed#3810) and the
resolved config.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from mtrec_dist.config import Config
from mtrec_dist.utils import atomic_write_json

DS_TAG = "ds"
STATE_FILE = "train_state.json"
STATE_KEYS = ("format", "position", "world_size", "zero_stage", "config")


def save(engine, cfg: Config, pos, rank: int) -> None:
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="mtrec-ckpt-") as d:
        engine.save_checkpoint(d, tag=DS_TAG, client_state={"position": asdict(pos)})
        if rank == 0:
            atomic_write_json(
                Path(d) / STATE_FILE,
                {
                    "format": 1,
                    "position": asdict(pos),
                    "world_size": engine.world_size,
                    "zero_stage": engine.zero_optimization_stage(),
                    "config": cfg.to_dict(),
                },
            )
        ray.train.report(
            {"step": pos.step, "epoch": pos.epoch}, checkpoint=Checkpoint.from_directory(d)
        )


def read_state(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a mtrec_dist checkpoint ({STATE_FILE} missing)")
    state = json.loads(path.read_text())
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    return state


def restore(engine, checkpoint):
    """Load the engine from a Ray checkpoint; return its Position (None when there is none)."""
    if checkpoint is None:
        return None
    import torch.distributed as dist

    from mtrec_dist.train.loop import Position

    with checkpoint.as_directory() as d:
        state = read_state(d)
        if state["world_size"] != engine.world_size:
            raise ValueError(
                f"checkpoint {d} was written by {state['world_size']} workers, this run has "
                f"{engine.world_size}: keep trainer.num_workers for a resume (or convert with "
                "zero_to_fp32 and start a new run)"
            )
        if state["zero_stage"] != engine.zero_optimization_stage():
            raise ValueError(
                f"checkpoint {d} used ZeRO-{state['zero_stage']}, this run ZeRO-"
                f"{engine.zero_optimization_stage()}: keep the DeepSpeed JSON for a resume"
            )
        engine.load_checkpoint(d, tag=DS_TAG)
        if dist.is_initialized():
            dist.barrier()  # inside the `with` block (ray PR #38141)
    return Position(**state["position"])


def full_state_dict(engine, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """fp32 weights gathered from DeepSpeed's partitions (collective); the dict on rank 0 only."""
    from deepspeed.utils import safe_get_full_fp32_param

    stage = engine.zero_optimization_stage()
    sd: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p) if (stage > 0 and p.requires_grad) else None
        if full is None:
            full = p.detach() if stage < 3 else _gather(p)
        sd[name] = full.detach().float().cpu().clone()
    buffers = {n: b.detach().cpu().clone() for n, b in model.named_buffers()}
    sd.update({n: b for n, b in buffers.items() if n in model.state_dict()})
    return sd if engine.global_rank == 0 else None


def _gather(p: torch.nn.Parameter) -> torch.Tensor:
    import deepspeed

    with deepspeed.zero.GatheredParameters([p]):
        return p.detach().clone()


def export_final(engine, model, cfg: Config, manifest: dict, pos, rank: int) -> None:
    """Save a last checkpoint (for zero_to_fp32 and resume) and export the run folder."""
    if cfg.trainer.checkpoint_every == 0 or pos.step % cfg.trainer.checkpoint_every:
        save(engine, cfg, pos, rank)
    sd = full_state_dict(engine, model)
    if rank == 0:
        from mtrec_dist.train.export import export_run

        # The module keys (not the state dict's) decide which weights the export holds.
        export_run(model, cfg, manifest, pos.step, state_dict=sd)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
