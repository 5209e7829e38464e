"""Resolve and validate a DeepSpeed JSON before any worker starts.

The YAML config owns the batch arithmetic, gradient clipping and the optimizer/schedule
(configured once in ``trainer.*``); the DeepSpeed JSON owns DeepSpeed settings only (ZeRO stage, precision,
buckets, offload). Fields the YAML owns may be written ``"auto"`` in the JSON and are filled in
here, because raw DeepSpeed does not resolve ``"auto"``. An explicit value that contradicts the
YAML is an error naming both keys, and so is any ``"auto"`` left over.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtrec_dist.config import Config, ConfigError, TrainerConfig

# Top-level keys this project lets a DeepSpeed JSON set (DeepSpeed itself ignores unknown ones,
# so a typo there would silently do nothing).
ALLOWED_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_optimization",
    "bf16",
    "fp16",
    "steps_per_print",
    "wall_clock_breakdown",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "activation_checkpointing",
    "flops_profiler",
    "comms_logger",
    "checkpoint",
    "data_types",
    "memory_breakdown",
    "dump_state",
    "_comment",
}
OWNED_BY_YAML = {
    "optimizer": "trainer.lr / encoder_lr / weight_decay (AdamW is configured once)",
    "scheduler": "trainer.warmup_ratio (linear warm-up then decay, configured once)",
    "autotuning": "mtrec tune-deepspeed (DeepSpeed's autotuner calls exit() inside engines)",
}

# The DeepSpeed fields whose value the YAML decides: the JSON writes them "auto" (or the same
# value); resolve_deepspeed fills them in, mtrec tune-deepspeed leaves them "auto" in the
# winner's JSON. Key -> (the YAML setting that owns it, its value from trainer.* and the world).
YAML_OWNED_DS: dict[str, tuple[str, Callable[[TrainerConfig, int], Any]]] = {
    "train_batch_size": (
        "trainer.micro_batch x trainer.grad_accum x trainer.num_workers",
        lambda t, world: t.micro_batch * t.grad_accum * world,
    ),
    "train_micro_batch_size_per_gpu": ("trainer.micro_batch", lambda t, world: t.micro_batch),
    "gradient_accumulation_steps": ("trainer.grad_accum", lambda t, world: t.grad_accum),
    # DeepSpeed defaults to clipping at 1.0; the papers (and trainer.grad_clip=0) do not clip.
    "gradient_clipping": ("trainer.grad_clip", lambda t, world: t.grad_clip),
}

DEFAULT_DS = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 1},
    "steps_per_print": 1000000,
}


def _find_auto(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _find_auto(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if obj == "auto" else []


def load_ds_json(path: str) -> dict:
    if not path:
        return copy.deepcopy(DEFAULT_DS)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed={path}: no such file (see configs/deepspeed/)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}:{e.lineno}: not valid JSON: {e.msg}") from e


def resolve_deepspeed(cfg: Config, world_size: int | None = None) -> dict:
    """The DeepSpeed config dict for ``cfg`` with every ``"auto"`` filled and checked."""
    src = cfg.deepspeed or "<default ZeRO-1 fp32>"
    ds = load_ds_json(cfg.deepspeed)
    if not isinstance(ds, dict):
        raise ConfigError(f"{src}: expected a JSON object")
    for k in ds:
        if k in OWNED_BY_YAML:
            raise ConfigError(
                f"{src}: key '{k}' is owned by the YAML config: set {OWNED_BY_YAML[k]}"
            )
        if k not in ALLOWED_KEYS:
            raise ConfigError(
                f"{src}: unknown key '{k}'; allowed: {', '.join(sorted(ALLOWED_KEYS))}"
            )
    _check_sections(ds, src)
    t = cfg.trainer
    world = world_size or t.num_workers
    for key, (yaml_key, value_of) in YAML_OWNED_DS.items():
        value = value_of(t, world)
        have = ds.get(key, "auto")
        if have != "auto" and have != value:
            raise ConfigError(
                f'{src}: {key}={have} contradicts {yaml_key} = {value}; write "auto" in the JSON '
                "(the YAML owns batch sizes)"
            )
        ds[key] = value
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage must be 0, 1, 2 or 3")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{src}: bf16.enabled and fp16.enabled are both true; pick one")
    if ds.get("fp16", {}).get("enabled") and t.surgery != "none":
        # the fused surgery sets each group's gradient aside and discards DeepSpeed's state
        # before its overflow check (ds_engine.py): an inf of one group would reach the step
        raise ConfigError(
            f"{src}: fp16.enabled with trainer.surgery={t.surgery}: a loss-scale overflow in a "
            "set-aside group's gradient would go unseen; use bf16 (no loss scaling, the model "
            "in bf16 and the Gram matrix in float64) or trainer.surgery=none"
        )
    # gradient_clipping is DeepSpeed's and acts once, on the combined (post-surgery) gradient:
    # the surgery writes into DeepSpeed's buffer before the single engine.step().
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    # (offload works with trainer.surgery=none only; the fused surgery refuses it in ds_engine.py)
    if offload:  # our AdamW (trainer.*) runs on the host copy; DeepSpeed would demand its own
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    left = _find_auto(ds)
    if left:
        raise ConfigError(f"{src}: no value for 'auto' at {', '.join(left)}")
    _validate_zero_section(zero, src)
    ds.setdefault("steps_per_print", 1000000)
    return ds


# Sections that DeepSpeed reads as objects; a bare value (``"bf16": true``) would end in an
# AttributeError deep inside DeepSpeed (or here).
_OBJECTS = ("bf16", "fp16", "zero_optimization", "activation_checkpointing", "checkpoint")
_ZERO_OBJECTS = ("offload_optimizer", "offload_param")


def _check_sections(ds: dict, src: str) -> None:
    for key in _OBJECTS:
        if key in ds and not isinstance(ds[key], dict):
            hint = ' (e.g. {"enabled": true})' if key in ("bf16", "fp16") else ""
            raise ConfigError(
                f"{src}: key '{key}' = {json.dumps(ds[key])}; expected a JSON object{hint}"
            )
    zero = ds.get("zero_optimization", {})
    for key in _ZERO_OBJECTS:
        if key in zero and not isinstance(zero[key], dict):
            raise ConfigError(
                f"{src}: key 'zero_optimization.{key}' = {json.dumps(zero[key])}; expected a JSON "
                'object such as {"device": "cpu"} (or leave the key out for no offload)'
            )


def _validate_zero_section(zero: dict, src: str) -> None:
    """Let DeepSpeed's own pydantic model reject a misspelt zero_optimization key."""
    try:  # lazy: the driver validates here but imports deepspeed only for this (ray#50406)
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except Exception:  # pragma: no cover - deepspeed import can fail on exotic drivers
        return
    try:
        DeepSpeedZeroConfig(**zero)
    except Exception as e:
        first = str(e).splitlines()
        raise ConfigError(f"{src}: zero_optimization: {' '.join(first[:3])}") from e


def describe(ds: dict) -> str:
    z = ds.get("zero_optimization", {})
    prec = (
        "bf16"
        if ds.get("bf16", {}).get("enabled")
        else "fp16"
        if ds.get("fp16", {}).get("enabled")
        else "fp32"
    )
    off = z.get("offload_optimizer", {}).get("device", "none")
    return (
        f"ZeRO-{z.get('stage', 0)} {prec}, offload={off}, global batch {ds['train_batch_size']} = "
        f"{ds['train_micro_batch_size_per_gpu']} micro x {ds['gradient_accumulation_steps']} accumulation"
        f" x {ds['train_batch_size'] // (ds['train_micro_batch_size_per_gpu'] * ds['gradient_accumulation_steps'])} workers"
    )
