"""Driver side of training: validate everything, then run Ray Train's TorchTrainer.

Nothing heavy happens here before validation: the config, the DeepSpeed JSON (``"auto"``
filled, contradictions named), the prepared data and the model/task choices are checked on the
driver so that a mistake fails in seconds, not after workers start. ``deepspeed`` is imported
only inside workers (ray#50406).
"""

from __future__ import annotations

import os
from pathlib import Path

from mtrec_dist.config import Config, ConfigError, load_config
from mtrec_dist.train.console import CONSOLE_FILE, RAY_DRIVER_LOG, following, ray_driver_logs_to

RAY_DIR = "ray"  # RUN_DIR/ray/<name>/checkpoint_* : Ray Train storage
RAY_NAME = "train"


def validate_for_training(cfg: Config) -> tuple[dict, dict]:
    """(manifest, resolved DeepSpeed dict) or a clear error naming the key to fix.

    Side effect: ``cfg.model.groups`` is narrowed to the groups the model computes."""
    from mtrec_dist.data.prepared import check_tokenizer, load_manifest, split_info
    from mtrec_dist.hub import load_tokenizer, tokenizer_fingerprint
    from mtrec_dist.models.registry import build_model, resolve_groups
    from mtrec_dist.train.dsconfig import resolve_deepspeed

    ds = resolve_deepspeed(cfg)
    manifest = load_manifest(cfg.prepared_dir)
    check_tokenizer(manifest, tokenizer_fingerprint(load_tokenizer(cfg.model.encoder)))
    # Build once on the driver: every model/task error surfaces here, and the gradient groups
    # shipped to the workers are the ones this model really computes.
    cfg.model.groups = resolve_groups(cfg, build_model(cfg, manifest))
    if not split_info(manifest, "train", cfg.prepared_dir).get("clicks"):
        raise ConfigError(f"{cfg.prepared_dir}: the train split has no clicks to train on")
    return manifest, ds


def checkpoints_of(run_dir: str | Path) -> list[Path]:
    return sorted(
        p for p in (Path(run_dir) / RAY_DIR / RAY_NAME).glob("checkpoint_*") if p.is_dir()
    )


def run_training(cfg: Config, resume: str | None = None) -> dict:
    """Train with ``trainer.num_workers`` Ray Train workers, each a DeepSpeed engine."""
    if resume:
        cfg = _resume_config(cfg, resume)
    elif checkpoints_of(cfg.run_dir):
        raise ConfigError(
            f"run_dir={cfg.run_dir} already holds checkpoints: continue it with "
            f"--resume {cfg.run_dir}, or set run_dir to a new folder"
        )
    # Workers do not share the driver's working directory: ship absolute paths.
    cfg.data.root = str(Path(cfg.data.root).resolve())
    cfg.data.prepared = str(cfg.prepared_dir.resolve())
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    manifest, ds = validate_for_training(cfg)

    import ray

    from mtrec_dist.data.stream import batches_per_epoch
    from mtrec_dist.train.dsconfig import describe

    t = cfg.trainer
    per_epoch = batches_per_epoch(manifest, t.num_workers, t.micro_batch, t.seed, 0) // t.grad_accum
    steps = per_epoch * t.epochs if t.max_steps <= 0 else min(per_epoch * t.epochs, t.max_steps)
    print(
        f"train: {cfg.model.name} on {cfg.model.encoder}; {describe(ds)}; {per_epoch} optimizer "
        f"steps/epoch, {steps} steps; surgery={t.surgery} ({t.surgery_scope}); "
        f"groups={cfg.model.groups}; run_dir={cfg.run_dir}",
        flush=True,
    )
    # Ray Train's print patch echoes every worker line twice on the driver (Ray 2.60); the
    # variable is propagated from here to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    run_dir = Path(cfg.run_dir)
    with ray_driver_logs_to(run_dir / RAY_DRIVER_LOG) as driver_log:
        if not ray.is_initialized():
            # Workers are not echoed: the console shows rank 0's console.log (train/console.py).
            ray.init(
                address=os.environ.get("RAY_ADDRESS"),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"MTREC_QUIET": os.environ.get("MTREC_QUIET", "")}},
            )
        print(f"ray logs: {_ray_logs_dir()} (driver: {driver_log})", flush=True)
        result = _fit(ray, cfg, ds, run_dir)
    ckpt = result.checkpoint.path if result.checkpoint else None
    return {"run_dir": cfg.run_dir, "steps": steps, "last_checkpoint": ckpt}


def _ray_logs_dir() -> str:
    """Ray's log folder on this node (where every worker's and actor's output stays)."""
    import ray

    try:
        return str(ray._private.worker.global_worker.node.get_logs_dir_path())
    except AttributeError:  # connected to a cluster whose node object is not local
        return "the Ray session's logs/ folder on each node"


def _fit(ray, cfg: Config, ds: dict, run_dir: Path):
    """Ray Train's TorchTrainer over ``train_worker``, rank 0's console lines followed."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mtrec_dist.train.loop import train_worker

    t = cfg.trainer
    storage = run_dir.resolve() / RAY_DIR
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "ds": ds},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo", timeout_s=t.timeout_s),
        run_config=RunConfig(
            name=RAY_NAME,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, t.keep_checkpoints)),
        ),
    )
    with following(run_dir / CONSOLE_FILE):
        return trainer.fit()


def _resume_config(cfg: Config, run_dir: str) -> Config:
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: {saved} is missing (not a run folder)")
    if not checkpoints_of(run_dir):
        raise FileNotFoundError(f"--resume {run_dir}: no checkpoint under {run_dir}/{RAY_DIR}")
    resumed = load_config(saved)
    resumed.run_dir = run_dir
    # Only the length of the run may change on resume; everything else must match.
    resumed.trainer.max_steps = cfg.trainer.max_steps or resumed.trainer.max_steps
    resumed.trainer.epochs = max(cfg.trainer.epochs, resumed.trainer.epochs)
    return resumed
