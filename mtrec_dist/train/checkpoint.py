"""Checkpoints in the run folder, the position they restore, and the final export
(docs/design.md §6 Checkpoints and resume).

Layout: ``RUN_DIR/checkpoints/step_<8 digits>/`` holds DeepSpeed's files (tag ``ds``, one
partition per rank), ``train_state.json`` and, last, the ``COMPLETE`` marker. Every rank writes
its partition, a barrier waits for all of them, then rank 0 writes the state and renames the
marker into place (atomic), then a second barrier. So a checkpoint is complete exactly when its
marker exists, it is complete before the step after it runs, and a crash at any moment leaves
at most one incomplete folder, which every reader ignores and names.

A restart under ``trainer.max_failures`` and ``--resume`` both load the newest complete
checkpoint (:func:`newest_complete`). Retention is applied by rank 0 after each save to every
folder on disk: the newest ``trainer.keep_checkpoints`` complete ones stay, incomplete ones
older than the newest complete one go. Ray Train is not told about checkpoints: its registry
is filled asynchronously, so the checkpoint Ray restarts from could be older than the newest
one written (a worker killed right after a save), and folders it never recorded escaped its
retention.

A checkpoint describes itself: ``train_state.json`` holds the position (step, epoch, batches
consumed), the world size and ZeRO stage (a resume must keep both: DeepSpeed#3810), the id of
the launch that wrote it (a new run adopts only its own checkpoints) and the resolved config.
``rng/rank_NNNNN.pt`` holds each rank's random generators (torch CPU and CUDA, numpy's and
Python's global ones): dropout draws from them, so without them a resumed run is not the
uninterrupted one (docs/design.md §6). ``engine.save_checkpoint`` is collective: every rank
calls :func:`save` the same number of times.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtrec_dist.config import Config
from mtrec_dist.train.ds_engine import full_state_dict, load_engine, save_engine
from mtrec_dist.train.export import export_run
from mtrec_dist.utils import atomic_open, atomic_write_json

CKPT_DIR = "checkpoints"  # RUN_DIR/checkpoints/step_XXXXXXXX
DS_TAG = "ds"
STATE_FILE = "train_state.json"
COMPLETE = "COMPLETE"
STATE_KEYS = ("format", "position", "world_size", "zero_stage", "config")
RNG_DIR = "rng"  # step_XXXXXXXX/rng/rank_NNNNN.pt: one file of generator states per rank
_NAME = re.compile(r"step_(\d{8})")


@dataclass
class Position:
    """Where training is: restored from a checkpoint so the data stream continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` consumed (same on every rank)
    samples: int = 0  # real training samples seen, all ranks


def checkpoint_folder(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}"


def scan(run_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint folders of a run, each sorted by step."""
    root = Path(run_dir) / CKPT_DIR
    found = sorted(p for p in root.glob("step_*") if p.is_dir() and _NAME.fullmatch(p.name))
    complete = [p for p in found if (p / COMPLETE).is_file()]
    return complete, [p for p in found if p not in complete]


def newest_complete(run_dir: str | Path, say=print, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint of the run (None: none); incomplete ones are named.

    With ``run_id`` only checkpoints written by that launch count (a new run never adopts a
    checkpoint it did not write, e.g. another run's in the same folder); the others are named.
    """
    complete, incomplete = scan(run_dir)
    if incomplete:
        say(
            f"checkpoints: ignoring incomplete {', '.join(p.name for p in incomplete)} under "
            f"{Path(run_dir) / CKPT_DIR} (no {COMPLETE} marker: the save was interrupted)"
        )
    if run_id is not None:
        foreign = [p for p in complete if _run_id_of(p) != run_id]
        if foreign:
            say(
                f"checkpoints: ignoring {', '.join(p.name for p in foreign)} under "
                f"{Path(run_dir) / CKPT_DIR}: written by another run (this run is new)"
            )
        complete = [p for p in complete if p not in foreign]
    return complete[-1] if complete else None


def _run_id_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, cfg: Config, pos: Position, rank: int, run_id: str | None = None) -> Path:
    """Write a complete checkpoint of ``pos`` (collective) and apply retention.

    A write that fails (disk full, file too large, read-only folder) raises ``OSError`` naming
    the checkpoint folder before any ``COMPLETE`` marker is written: the previous checkpoint
    stays the newest complete one, and the half-written folder is ignored by every reader."""
    folder = checkpoint_folder(cfg.run_dir, pos.step)
    if (folder / COMPLETE).is_file():  # resumed at this very step: nothing new to save
        return folder
    if rank == 0 and folder.exists():  # an incomplete save of this step before a restart
        shutil.rmtree(folder)
    _barrier()
    try:
        save_engine(engine, folder, DS_TAG)
        save_rng(folder, rank)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError
        raise OSError(
            f"checkpoint {folder}: writing rank {rank}'s files failed ({type(e).__name__}: "
            f"{_first_line(e)}); the newest complete checkpoint is still "
            f"{newest_complete(cfg.run_dir, say=lambda _: None)} (free space or fix the "
            "folder's permissions, then --resume)"
        ) from e
    _barrier()  # every partition is on disk
    if rank == 0:
        state = {
            "format": 1,
            "position": asdict(pos),
            "world_size": engine.world_size,
            "zero_stage": engine.zero_optimization_stage(),
            "run_id": run_id,
            "config": cfg.to_dict(),
        }
        atomic_write_json(folder / STATE_FILE, state)
        atomic_write_json(folder / COMPLETE, {"step": pos.step})
        prune(cfg.run_dir, cfg.trainer.keep_checkpoints)
    _barrier()
    return folder


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def rng_path(folder: Path, rank: int) -> Path:
    return Path(folder) / RNG_DIR / f"rank_{rank:05d}.pt"


def save_rng(folder: Path, rank: int) -> None:
    """This rank's generator states, atomically (tensors, ints and lists only, so the file
    loads with ``weights_only=True``)."""
    name, keys, npos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), npos, has_gauss, gauss],
        "python": list(random.getstate()),
    }
    with atomic_open(rng_path(folder, rank), "wb") as f:
        torch.save(state, f)


def restore_rng(folder: Path, rank: int) -> bool:
    """Set this rank's generators from ``folder`` (False: the checkpoint has none, it was
    written before they were saved). Errors name the file."""
    path = rng_path(folder, rank)
    if not path.is_file():
        return False
    try:
        st = torch.load(path, weights_only=True)
        name, keys, npos, has_gauss, gauss = st["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), npos, has_gauss, gauss))
        version, internal, gauss_next = st["python"]
        random.setstate((version, tuple(internal), gauss_next))
        torch.set_rng_state(st["torch"])
        if st["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])
    except Exception as e:  # noqa: BLE001 - any damage is reported with the file's name
        raise ValueError(
            f"{path}: not a readable generator-state file ({type(e).__name__}: "
            f"{_first_line(e)}); expected the file save_rng writes (keys torch, cuda, numpy, "
            "python)"
        ) from e
    return True


def prune(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` (at least 1) complete checkpoints, and incomplete ones
    older than the newest complete; return what was deleted."""
    complete, incomplete = scan(run_dir)
    if not complete:
        return []
    newest = complete[-1].name
    gone = complete[: -max(1, keep)] + [p for p in incomplete if p.name < newest]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def read_state(ckpt_dir: str | Path) -> dict:
    """``train_state.json`` of a checkpoint, checked; errors name the file and key."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a mtrec_dist checkpoint ({STATE_FILE} missing)")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected the object "
                         f"written at save time with keys {', '.join(STATE_KEYS)}") from e  # fmt: skip
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {', '.join(STATE_KEYS)}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    names = {f.name for f in fields(Position)}
    pos = state["position"]
    if not (isinstance(pos, dict) and set(pos) == names and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pos.values()
    )):  # fmt: skip
        raise ValueError(
            f"{path}: key 'position' = {pos!r}; expected an object of non-negative integers "
            f"with keys {', '.join(sorted(names))}"
        )
    for key in ("world_size", "zero_stage"):
        if not isinstance(state[key], int) or isinstance(state[key], bool):
            raise ValueError(f"{path}: key '{key}' = {state[key]!r}; expected an integer")
    return state


def restore(engine, folder: Path | None) -> Position | None:
    """Load the engine from a checkpoint folder; return its Position (None when there is none)."""
    if folder is None:
        return None

    state = read_state(folder)
    if state["world_size"] != engine.world_size:
        raise ValueError(
            f"checkpoint {folder} was written by {state['world_size']} workers, this run has "
            f"{engine.world_size}: keep trainer.num_workers for a resume (or convert with "
            "zero_to_fp32 and start a new run)"
        )
    if state["zero_stage"] != engine.zero_optimization_stage():
        raise ValueError(
            f"checkpoint {folder} used ZeRO-{state['zero_stage']}, this run ZeRO-"
            f"{engine.zero_optimization_stage()}: keep the DeepSpeed JSON for a resume"
        )
    load_engine(engine, folder, DS_TAG)
    _barrier()
    return Position(**state["position"])


def export_final(
    engine, model, cfg: Config, manifest: dict, pos: Position, rank: int, run_id: str | None = None
) -> None:
    """Save a last checkpoint (for zero_to_fp32 and resume) and export the run folder."""
    if cfg.trainer.checkpoint_every == 0 or pos.step % cfg.trainer.checkpoint_every:
        save(engine, cfg, pos, rank, run_id)
    sd = full_state_dict(engine, model)
    if rank == 0:
        # The module keys (not the state dict's) decide which weights the export holds.
        export_run(model, cfg, manifest, pos.step, state_dict=sd)
    _barrier()
