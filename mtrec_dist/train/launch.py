"""Driver side of training: validate everything, then run Ray Train's TorchTrainer.

Nothing heavy happens here before validation: the config, the DeepSpeed JSON (``"auto"``
filled, contradictions named), the prepared data and the model/task choices are checked on the
driver so that a mistake fails in seconds, not after workers start. ``deepspeed`` is imported
only inside workers (ray#50406). ``ray`` is imported inside the functions that start the run
(``import ray.train`` alone takes seconds): validation, ``checkpoints_of`` and the resume checks
(which the unit tests call on their own) never import it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

from mtrec_dist.config import Config, ConfigError, load_config, parse_override
from mtrec_dist.data.prepared import check_tokenizer, load_manifest, split_info
from mtrec_dist.hub import load_tokenizer, tokenizer_fingerprint
from mtrec_dist.models import layer_cache
from mtrec_dist.models.registry import build_model, resolve_groups
from mtrec_dist.train.checkpoint import newest_complete, read_state, scan
from mtrec_dist.train.console import CONSOLE_FILE, RAY_DRIVER_LOG, following, ray_driver_logs_to
from mtrec_dist.train.dsconfig import describe, resolve_deepspeed
from mtrec_dist.train.errors import TrainingFailed
from mtrec_dist.train.loop import train_worker
from mtrec_dist.train.runlock import reap_at_exit, run_lock
from mtrec_dist.train.steps import step_plan
from mtrec_dist.utils import atomic_write_text, ray_address

RAY_DIR = "ray"  # RUN_DIR/ray/<name>: Ray Train's own run state (checkpoints: checkpoint.py)
RAY_NAME = "train"
# What ``--resume RUN_DIR key=value ...`` may change: how long the run goes on, how often it
# logs/saves/evaluates, fault handling, and the evaluator. Anything else would make the resumed
# run differ from the one its checkpoint belongs to (or not load), and is refused by name.
SAFE_ON_RESUME = (
    "trainer.max_steps",
    "trainer.epochs",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.eval_every",
    "trainer.max_failures",
    "trainer.timeout_s",
    "trainer.cpus_per_worker",
    "eval.",
)


def validate_for_training(cfg: Config) -> tuple[dict, dict]:
    """(manifest, resolved DeepSpeed dict) or a clear error naming the key to fix.

    Side effect: ``cfg.model.groups`` is narrowed to the groups the model computes."""
    ds = resolve_deepspeed(cfg)
    manifest = load_manifest(cfg.prepared_dir)
    check_tokenizer(manifest, tokenizer_fingerprint(load_tokenizer(cfg.model.encoder)))
    # Build once on the driver: every model/task error surfaces here, and the gradient groups
    # shipped to the workers are the ones this model really computes.
    cfg.model.groups = resolve_groups(cfg, build_model(cfg, manifest))
    train = split_info(manifest, "train", cfg.prepared_dir)
    if not train.get("clicks"):
        raise ConfigError(f"{cfg.prepared_dir}: the train split has no clicks to train on")
    n_shards, workers = len(train["shards"]), cfg.trainer.num_workers
    if n_shards < workers:  # shards are dealt whole to ranks: the rest would train on nothing
        per = -(-int(train["impressions"]) // workers)
        raise ConfigError(
            f"{cfg.prepared_dir}: the train split has {n_shards} shard(s) for "
            f"trainer.num_workers={workers}; shards are dealt whole to workers, so "
            f"{workers - n_shards} worker(s) would get no data. Re-run `mtrec prepare` with "
            f"data.impressions_per_shard={per} or less, or lower trainer.num_workers"
        )
    return manifest, ds


def checkpoints_of(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (incomplete ones are never listed)."""
    return scan(run_dir)[0]


def run_training(
    cfg: Config, resume: str | None = None, overrides: list[str] | None = None
) -> dict:
    """Train with ``trainer.num_workers`` Ray Train workers, each a DeepSpeed engine.

    With ``resume`` (a run folder) the run's saved config is used, changed only by those
    ``overrides`` (``key=value``) that are safe on a resume (``SAFE_ON_RESUME``). The run
    folder is locked for the whole run (one writer, docs/design.md §6): a second run into it
    is refused here, before any worker starts."""
    folder = Path(resume or cfg.run_dir)
    if resume and not folder.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such run folder")
    with run_lock(folder):
        return _run_locked(cfg, resume, overrides or [])


def _run_locked(cfg: Config, resume: str | None, overrides: list[str]) -> dict:
    if resume:
        cfg = _resume_config(resume, overrides)
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
    if resume:
        _check_resumable(cfg, ds)

    import ray  # lazy: only once validation passed (module docstring)

    t = cfg.trainer
    plan = step_plan(manifest, t.num_workers, t)
    steps, per_epoch = plan.total_steps, plan.steps_per_epoch
    print(
        f"train: {cfg.model.name} on {cfg.model.encoder}; {describe(ds)}; {per_epoch} optimizer "
        f"steps/epoch, {steps} steps; surgery={t.surgery} ({t.surgery_scope}); "
        f"groups={cfg.model.groups}; run_dir={cfg.run_dir}",
        flush=True,
    )
    if cfg.model.train_layers != 0:
        build_layer_cache(cfg, manifest)
    # Ray Train's print patch echoes every worker line twice on the driver (Ray 2.60); the
    # variable is propagated from here to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # A restart that cannot get its workers' resources (a node lost, no spare) waits for them
    # at most trainer.timeout_s, then fails (controller_failure_limit=0 in _fit) instead of
    # Ray Train's default of retrying every 60 s forever (docs/design.md §6).
    # Set on every run (not setdefault): an earlier run in this process must not leave its value.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(t.timeout_s)
    run_dir = Path(cfg.run_dir)
    run = {"id": uuid.uuid4().hex, "resume": bool(resume)}  # a new run adopts only its own
    with ray_driver_logs_to(run_dir / RAY_DRIVER_LOG) as driver_log:
        if not ray.is_initialized():
            if not os.environ.get("RAY_ADDRESS"):  # a local Ray: it dies with this process
                reap_at_exit()
            # Workers are not echoed: the console shows rank 0's console.log (train/console.py).
            ray.init(
                address=ray_address(),
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"MTREC_QUIET": os.environ.get("MTREC_QUIET", "")}},
            )
        print(f"ray logs: {_ray_logs_dir()} (driver: {driver_log})", flush=True)
        _fit(cfg, ds, run_dir, run)
    ckpts = checkpoints_of(cfg.run_dir)
    return {
        "run_dir": cfg.run_dir,
        "steps": steps,
        "last_checkpoint": str(ckpts[-1]) if ckpts else None,
    }


def build_layer_cache(cfg: Config, manifest: dict) -> None:
    """The frozen encoder layers' per-news cache (docs/design.md §3.1), built here on the
    driver with a progress bar rather than silently inside the workers (whose output stays in
    Ray's logs); the workers then find it complete. A worker on a node that cannot see this
    prepared folder builds its node's own."""
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg, manifest)
    cache = layer_cache.build_cache(
        model.encoder, cfg.prepared_dir, deadline_s=cfg.trainer.timeout_s
    )
    if cache is not None:
        gib = cache.states.nbytes / 2**30
        print(
            f"layer cache: {cache.folder} ({gib:.2f} GiB, {model.encoder.frozen_layers} frozen layers)"
        )


def _ray_logs_dir() -> str:
    """Ray's log folder on this node (where every worker's and actor's output stays)."""
    import ray  # lazy: only once validation passed (module docstring)

    try:
        return str(ray._private.worker.global_worker.node.get_logs_dir_path())
    except AttributeError:  # connected to a cluster whose node object is not local
        return "the Ray session's logs/ folder on each node"


def _fit(cfg: Config, ds: dict, run_dir: Path, run: dict) -> None:
    """Ray Train's TorchTrainer over ``train_worker``, rank 0's console lines followed."""
    # lazy: only once validation passed (module docstring)
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.trainer
    storage = run_dir.resolve() / RAY_DIR
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "ds": ds, "run": run},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo", timeout_s=t.timeout_s),
        run_config=RunConfig(
            name=RAY_NAME,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=t.max_failures, controller_failure_limit=0),
        ),
    )
    try:
        with following(run_dir / CONSOLE_FILE):
            trainer.fit()
    except TrainingFailedError as e:
        err = _training_failed(e, run_dir)
        # Ray's own details, for callers that read them (the tuner's failure table)
        err.worker_failures = getattr(e, "worker_failures", None)
        err.controller_failure = getattr(e, "controller_failure", None)
        raise err from None


ERROR_LOG = "logs/train_error.log"  # RUN_DIR/logs/: the full failure, every worker's traceback


def _training_failed(e: Exception, run_dir: Path) -> TrainingFailed:
    """Ray's error (its own traceback wrapping each worker's) to our one line: the first
    failing rank's exception, and where the full text was written."""
    failures = getattr(e, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        cause = failures[rank]
        where = f"rank {rank}"
    else:
        cause, where = getattr(e, "controller_failure", e), "Ray Train's controller"
    cause = getattr(cause, "_base_exc", cause)  # Ray's wrapper of a worker's exception
    text = str(cause).strip()
    log = run_dir / ERROR_LOG
    full = [str(e).rstrip("\n")]  # Ray's summary cuts tracebacks short: each one in full
    full += [f"--- rank {r} ---\n{str(x).rstrip()}" for r, x in sorted(failures.items())]
    atomic_write_text(log, "\n".join(full) + "\n")
    first = text.splitlines()[0] if text else ""
    return TrainingFailed(f"training failed on {where}: {type(cause).__name__}: {first} "
                          f"(full log: {log})")  # fmt: skip


def _check_resumable(cfg: Config, ds: dict) -> None:
    """What the workers would refuse after start-up, refused here (DeepSpeed#3810): the
    newest checkpoint's world size and ZeRO stage against this run's."""
    folder = newest_complete(cfg.run_dir, say=lambda _: None)
    state = read_state(folder)
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if state["world_size"] != cfg.trainer.num_workers:
        raise ConfigError(
            f"checkpoint {folder} was written by {state['world_size']} workers, this run has "
            f"trainer.num_workers={cfg.trainer.num_workers}: keep it for a resume"
        )
    if state["zero_stage"] != stage:
        raise ConfigError(
            f"checkpoint {folder} used ZeRO-{state['zero_stage']}, the DeepSpeed config "
            f"{cfg.deepspeed or '(default)'} ZeRO-{stage}: keep the DeepSpeed JSON for a resume"
        )


def _resume_config(run_dir: str, overrides: list[str]) -> Config:
    """The saved config of ``run_dir`` with the safe ``overrides`` applied; others refused."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: {saved} is missing (not a run folder)")
    if not checkpoints_of(run_dir):
        raise FileNotFoundError(
            f"--resume {run_dir}: no complete checkpoint under {Path(run_dir) / 'checkpoints'}"
        )
    before = load_config(saved)
    changed = load_config(saved, overrides)  # validates every override (key, type, range)
    refused = []
    for text in overrides:
        key = parse_override(text)[0]
        if key.startswith(SAFE_ON_RESUME) and key != "eval.":
            continue
        if _lookup(before, key) != _lookup(changed, key):
            refused.append(f"{key} (saved {_lookup(before, key)!r}, asked {text.split('=', 1)[1]})")
    if refused:
        raise ConfigError(
            f"--resume {run_dir}: cannot change {'; '.join(refused)}: the checkpoint belongs to "
            f"the saved value (start a new run to change it). Safe to change on a resume: "
            f"{', '.join(k + '*' if k.endswith('.') else k for k in SAFE_ON_RESUME)}"
        )
    changed.run_dir = run_dir
    return changed


def _lookup(cfg: Config, dotted: str):
    obj = cfg.to_dict()
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj
