"""The DeepSpeed engine and everything that reads its internals, except the per-group gradient
buffers (``train/zero.py``): start-up, checkpoint files, ZeRO-3 gathers, full state dicts.

Three start-up choices keep a worker from waiting forever or running foreign code:

- DeepSpeed's CPU backend JIT-builds ``deepspeed_shm_comm`` (a shared-memory all-reduce used
  only by ``inference_all_reduce``) into the shared torch-extensions cache on every start; a
  build killed midway leaves a ``lock`` file there on which every later start waits silently.
  Training never calls it, so :func:`initialize` marks the op unavailable and nothing is built.
  Any JIT build that still happens goes into a folder of this project
  (:func:`extensions_dir`), and :func:`wait_for_build_locks` waits on a ``lock`` there at most
  ``deadline_s`` seconds, then raises naming the lock file.
- Checkpoint files are read with ``torch.load(weights_only=True)``: DeepSpeed's own engine
  unpickles anything (``weights_only=False``), so a crafted run folder would run its code on
  ``--resume``. :class:`SafeCheckpointEngine` allows only the DeepSpeed types a ZeRO
  checkpoint holds.
- Errors reading a checkpoint name the file and what was expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

SHM_OP = "deepspeed_shm_comm"


# --------------------------------------------------------------------------- start-up


def extensions_dir() -> Path:
    """Where JIT-built torch extensions go: ``MTREC_TORCH_EXTENSIONS_DIR``, else a folder per
    Python environment under ``~/.cache/mtrec_dist`` (another checkout's venv never rebuilds
    ours, and a stale lock of the shared cache is never ours to wait on)."""
    env = os.environ.get("MTREC_TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "mtrec_dist" / "torch_extensions" / tag


def wait_for_build_locks(folder: Path, deadline_s: float, poll_s: float = 0.2) -> None:
    """Wait until no ``lock`` file of a torch-extension build is left under ``folder``.

    A lock older than the deadline is a build that died midway: raise ``TimeoutError`` naming
    it (and the fix) instead of waiting on it forever as torch's ``FileBaton`` does."""
    end = time.monotonic() + deadline_s
    while True:
        locks = sorted(folder.glob("*/lock")) if folder.is_dir() else []
        if not locks:
            return
        if time.monotonic() >= end:
            raise TimeoutError(
                f"worker start-up waited {deadline_s:.0f} s on the torch-extension build lock(s) "
                f"{', '.join(map(str, locks))}: a build killed midway leaves one; delete it "
                "if no other process is building"
            )
        time.sleep(poll_s)


def _no_shm_build() -> None:
    import deepspeed.ops

    table = deepspeed.ops.__dict__.get("__compatible_ops__")
    if table is None:  # not probed yet: do not probe (it runs compilers); only shm is read
        deepspeed.ops.__compatible_ops__ = {SHM_OP: False}
    else:
        table[SHM_OP] = False


def initialize(model: torch.nn.Module, optimizer, scheduler, ds_config: dict, deadline_s: float):
    """``deepspeed.initialize`` without JIT builds into shared caches, with safe loading.

    Returns (engine, optimizer, scheduler) as DeepSpeed wraps them."""
    folder = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    wait_for_build_locks(folder, deadline_s)
    import deepspeed

    _no_shm_build()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
    return engine, optimizer, scheduler


# --------------------------------------------------------------------------- checkpoint files


def _allowed_globals() -> list:
    """The non-tensor types DeepSpeed writes into a ZeRO checkpoint (0.19.8)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` through ``torch.load(weights_only=True)``.

    Everything else (save, commit, ...) is the wrapped engine's."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return load_checkpoint_file(path, map_location)


def load_checkpoint_file(path: str | Path, map_location=None) -> Any:
    """``torch.load(weights_only=True)`` with the DeepSpeed allow-list; errors name the file."""
    import pickle
    import re

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"'{found.group(1)}'" if found else "an object torch refuses to unpickle"
        raise ValueError(
            f"{path}: refused to load: it holds {what}, not tensors or DeepSpeed's checkpoint "
            "types (loading it would run code from the file); only load checkpoints you wrote"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"{path}: not a readable torch checkpoint file ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); expected a complete "
            "file written by engine.save_checkpoint (truncated or damaged?)"
        ) from e


def save_engine(engine, folder: Path, tag: str) -> None:
    """Every rank writes its partition (collective)."""
    engine.save_checkpoint(str(folder), tag=tag)


def load_engine(engine, folder: Path, tag: str) -> None:
    """Load model, optimizer and scheduler state written by :func:`save_engine` (collective)."""
    path, _ = engine.load_checkpoint(str(folder), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{folder}/{tag}: DeepSpeed found no checkpoint to load there")


# --------------------------------------------------------------------------- weights


def gathered(model: torch.nn.Module, engine):
    """Context in which every parameter is whole on every rank (collective under ZeRO-3)."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


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


def peak_memory_mb(engine) -> float:
    """Peak accelerator memory of this worker, else its peak resident memory (MiB)."""
    if engine.device.type == "cuda":
        return torch.cuda.max_memory_allocated(engine.device) / 2**20
    from mtrec_dist.utils import peak_rss_mb

    return peak_rss_mb()
