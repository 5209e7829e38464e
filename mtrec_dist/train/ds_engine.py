"""Everything that knows DeepSpeed's internals: start-up, checkpoint files, ZeRO-3 gathers, full
state dicts, and per-group gradients with one fused surgery step under ZeRO 0/1/2/3.

No other module touches a DeepSpeed engine or its buffers (DeepSpeed 0.19.8): the loop and the
checkpoint code call the functions here (``dsconfig.py`` only borrows DeepSpeed's config model to
validate a JSON on the driver).

Start-up, checkpoint files and weights
--------------------------------------
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

Per-group gradients
-------------------
(Summarised in docs/design.md §4.3 Distributed form under ZeRO.)
Route delivered: **in place on the partition** (route 1), on every stage. Per micro-batch there
is one forward and one ``engine.backward`` per gradient group (``retain_graph`` between them),
each with the accumulation boundary set, so DeepSpeed reduces that group's gradient across
workers into this rank's partition with its own scaling (÷ world size, ÷ accumulation steps).
The reduced partition is then read where the optimizer step would read it:

- ZeRO 0: ``param.grad`` (all-reduced, replicated on every rank),
- ZeRO 1/2: ``optimizer.averaged_gradients[i]`` (per-parameter slices of this rank's partition,
  built by ``independent_gradient_partition_epilogue`` at the boundary; ``step`` flattens them),
- ZeRO 3: ``optimizer.grad_partitions_flat_buffer`` (this rank's fp32 partition of every param),

copied out into our buffer for the group, and DeepSpeed's gradient state is discarded the way
DeepSpeed itself discards an overflowed step (``zero_grad`` + ``averaged_gradients = None``), so
the next group's backward starts clean. The last group of the last micro-batch stays in
DeepSpeed's buffer; there we form, in place, ``g = Σ_t c_t g_t`` and call ``engine.step()``, so
DeepSpeed's clipping, scheduler and bookkeeping act once on the combined gradient.

The Gram matrix comes from partial dot products over this rank's partition (the shared params
only under scope ``shared``) and one all-reduce of T² float64 values. Under ZeRO 0 the gradient
is replicated, so each rank sums only the tensors it owns (tensor j on rank j mod W): no replica
is counted W times. The coefficients are computed from the all-reduced matrix, which is
identical on every rank, so every rank applies the same combination.

Communication: T reductions per micro-batch (ZeRO 2/3 reduce every micro-batch anyway, so this
is the volume of T ordinary steps; ZeRO 0/1, which normally reduce once per optimizer step, pay
T·gas instead of T when gradient accumulation is on). Extra memory: a [T−1, n] float buffer (n =
local partition elements) when ``gradient_accumulation_steps == 1``; with accumulation the last
group also needs an accumulator ([T, n]), because DeepSpeed's own buffer is cleared between
groups. ``stats['surgery/extra_bytes']`` reports it.

Not supported (raises): CPU/NVMe offload, pipeline parallelism, ``managed_gradient_accumulation:
false``. fp16 with a surgery is refused by ``dsconfig.resolve_deepspeed`` (the coefficients are
scale-invariant, but an overflow in a non-final group would not be detected); bf16 needs no loss
scaling, and the Gram matrix is float64 whatever the gradient dtype (:func:`gram64`).

On a GPU nothing here reads a tensor on the host during a step: the Gram matrix, the projection
and the coefficients stay on the device, and the statistics are formed when the loop logs
(``step(defer=True)``; docs/design.md §5, the GPU step).

Importing DeepSpeed
-------------------
``deepspeed`` is imported inside the functions that use it, never at the top: the Ray driver
imports this module (``launch`` → ``loop`` → here) and must not import deepspeed (ray#50406, see
``launch.py``), the import takes seconds, and :func:`initialize` must set
``TORCH_EXTENSIONS_DIR`` before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mtrec_dist.train import surgery
from mtrec_dist.utils import peak_rss_mb

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


def wait_for_build_locks(
    folder: Path,
    deadline_s: float,
    poll_s: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Wait until no ``lock`` file of a torch-extension build is left under ``folder``.

    A lock older than the deadline is a build that died midway: raise ``TimeoutError`` naming
    it (and the fix) instead of waiting on it forever as torch's ``FileBaton`` does. ``clock``
    and ``sleep`` are the time source (a test passes a simulated one)."""
    end = clock() + deadline_s
    while True:
        locks = sorted(folder.glob("*/lock")) if folder.is_dir() else []
        if not locks:
            return
        if clock() >= end:
            raise TimeoutError(
                f"worker start-up waited {deadline_s:.0f} s on the torch-extension build lock(s) "
                f"{', '.join(map(str, locks))}: a build killed midway leaves one; delete it "
                "if no other process is building"
            )
        sleep(poll_s)


def _no_shm_build() -> None:
    import deepspeed.ops  # lazy: deepspeed only in workers, see the module docstring

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
    # lazy: imported after TORCH_EXTENSIONS_DIR is set (above); workers only (module docstring)
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
    # lazy: deepspeed only in workers, see the module docstring
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` through ``torch.load(weights_only=True)``
    and ``save`` errors that name the file.

    Everything else (commit, ...) is the wrapped engine's."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return load_checkpoint_file(path, map_location)

    def save(self, state_dict, path: str):
        """The wrapped engine's save; a failed write (disk full, file too large, no
        permission: torch reports some as ``RuntimeError`` without a path) names the file."""
        try:
            return self._inner.save(state_dict, path)
        except (OSError, RuntimeError) as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise OSError(f"{path}: write failed ({type(e).__name__}: {text})") from e


def load_checkpoint_file(path: str | Path, map_location=None) -> Any:
    """``torch.load(weights_only=True)`` with the DeepSpeed allow-list; errors name the file."""
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
    import deepspeed  # lazy: deepspeed only in workers, see the module docstring

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def full_state_dict(engine, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """fp32 weights gathered from DeepSpeed's partitions (collective); the dict on rank 0 only."""
    # lazy: deepspeed only in workers, see the module docstring
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
    import deepspeed  # lazy: deepspeed only in workers, see the module docstring

    with deepspeed.zero.GatheredParameters([p]):
        return p.detach().clone()


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory of a worker training on ``device``, else its peak resident
    memory (MiB)."""
    gpu = gpu_peak_mb(device)
    return peak_rss_mb() if gpu is None else gpu


def gpu_peak_mb(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` of ``device`` in MiB; None off CUDA. A query of the
    caching allocator's counters on the host: no synchronisation with the device."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


# --------------------------------------------------------------------------- per-group gradients


@dataclass
class _Slot:
    """One tensor of this rank's gradient partition, as DeepSpeed will consume it."""

    view: torch.Tensor  # [n_j] 1-D view into DeepSpeed's buffer
    offset: int  # where it lives in our flat buffers
    shared: bool  # counts in the Gram / gets the surgery coefficients
    owned: bool  # this rank contributes it to the partial Gram (ZeRO 0: one replica only)


GRAM_CHUNK = 1 << 20  # elements per float64 block of the Gram products


def gram64(a: torch.Tensor, b: torch.Tensor, chunk: int = GRAM_CHUNK) -> torch.Tensor:
    """``a @ b.T`` ([r, n] x [s, n] -> [r, s]) with every product and sum in float64.

    Partial dot products formed in fp32/bf16 lose ~1e-3 relative over the 22M elements of
    MiniLM, and the Gram matrix decides the surgery coefficients; converting ``chunk`` columns
    at a time to float64 bounds the extra memory to ``(r + s) * chunk`` doubles."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[1], chunk):
        out += a[:, i : i + chunk].double() @ b[:, i : i + chunk].double().t()
    return out


class MultiTaskGradients:
    """Per-group gradients → Gram → coefficients → fused combination → ``engine.step()``.

    ``backward(group_losses)`` once per micro-batch (after one forward); ``step()`` at the
    accumulation boundary. ``groups`` fixes the order of the Gram matrix; ``shared_names`` are
    the names (as in ``model.named_parameters()``) that scope ``shared`` operates on.
    """

    def __init__(
        self,
        engine,
        model: torch.nn.Module,
        groups: list[str],
        mode: str,
        scope: str = "shared",
        shared_names: set[str] | None = None,
        seed: int = 0,
    ) -> None:
        if scope not in ("shared", "all"):
            raise ValueError(f"trainer.surgery_scope={scope!r}; allowed: shared, all")
        if mode not in surgery.METHODS:
            raise ValueError(
                f"trainer.surgery={mode!r} is not a surgery method; allowed: "
                f"{', '.join(surgery.METHODS)}"
            )
        if not groups:
            raise ValueError("MultiTaskGradients needs at least one gradient group")
        if not engine.managed_gradient_accumulation():
            raise ValueError(
                "DeepSpeed config: managed_gradient_accumulation must be true (the default)"
            )
        if getattr(engine, "pipeline_parallelism", False):
            raise ValueError("DeepSpeed pipeline parallelism is not supported by the surgery")
        # With optimizer offload the reduced gradients live in DeepSpeed's host buffers, which
        # the fused surgery does not read; plain summation needs no per-group gradient at all.
        self._summed = bool(engine.zero_cpu_offload() or engine.zero_nvme_offload_optimizer())
        if self._summed and mode != "none":
            raise ValueError(
                f"DeepSpeed config: zero_optimization.offload_optimizer is not supported by the "
                f"fused surgery trainer.surgery={mode} (gradients must stay in device memory); "
                "use trainer.surgery=none with offload, or a config without offload"
            )
        self.engine, self.model, self.groups, self.mode = engine, model, list(groups), mode
        self.scope, self.seed = scope, seed
        self.stage = int(engine.zero_optimization_stage())
        self.gas = int(engine.gradient_accumulation_steps())
        names = {id(p): n for n, p in model.named_parameters()}
        shared = set(shared_names or ())
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if scope == "shared" and not (shared & trainable) and mode != "none":
            # a wholly frozen encoder: G = 0 over an empty set, c = 1 (docs/design.md §4.1)
            if (dist.get_rank() if dist.is_initialized() else 0) == 0:
                print(surgery.nothing_shared_notice(mode, scope), flush=True)
        self._is_shared = {
            pid: (scope == "all" or n in shared) for pid, n in names.items()
        }  # param id -> shared?
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        self._world = dist.get_world_size() if dist.is_initialized() else 1
        self._bufs: torch.Tensor | None = None  # [T−1 or T, n] per-group accumulators
        self._segments: list[tuple[int, int]] | None = None  # shared+owned ranges in _bufs
        self._micro = 0
        self._overhead = 0.0  # seconds spent outside backward/step (copies, Gram, combination)

    # --- DeepSpeed's buffers, per stage --------------------------------------------------
    def _slots(self) -> list[_Slot]:
        """This rank's reduced gradient partition as 1-D views DeepSpeed's step will read."""
        opt = self.engine.optimizer
        views: list[tuple[torch.Tensor, bool, bool]] = []
        if self.stage == 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            for j, p in enumerate(params):
                if p.grad is None:  # a group that does not reach p: its gradient is 0
                    p.grad = torch.zeros_like(p)
                owned = j % self._world == self._rank
                views.append((p.grad.view(-1), self._is_shared[id(p)], owned))
        elif self.stage in (1, 2):
            for i, params in enumerate(opt.params_in_partition):
                tensors = opt.averaged_gradients.get(i)
                if tensors is None or hasattr(tensors, "flat_partition"):
                    raise RuntimeError(
                        f"ZeRO-{self.stage}: no per-parameter gradient partition for group {i} "
                        "(compact/offload buffers are not supported)"
                    )
                # One slice per param of the partition, in order, with zero pads between
                # (marked ``_zero_padding``) or after them (the unpadded layout's tail).
                it = iter(params)
                for t in tensors:
                    p = None if getattr(t, "_zero_padding", False) else next(it, None)
                    if p is None:
                        views.append((t.view(-1), False, False))  # zeros, never read
                    else:
                        views.append((t.view(-1), self._is_shared[id(p)], True))
        else:
            flat = opt.grad_partitions_flat_buffer
            off = 0
            for group in opt.fp16_groups:
                for p in group:
                    n = p.partition_numel()
                    views.append((flat.narrow(0, off, n), self._is_shared[id(p)], True))
                    off += n
        slots, off = [], 0
        for v, s, o in views:
            slots.append(_Slot(v, off, s, o))
            off += v.numel()
        return slots

    def _discard(self) -> None:
        """Clear DeepSpeed's gradient state, as DeepSpeed does for a skipped (overflow) step."""
        opt = self.engine.optimizer
        if self.stage == 0:
            for p in self.model.parameters():
                p.grad = None
        elif self.stage in (1, 2):
            opt.zero_grad(set_to_none=True)
            opt._release_preflattened_grad_buffers()
            for k in list(opt.averaged_gradients.keys()):
                opt.averaged_gradients[k] = None
                opt.all_grad_tensors[k] = None
        else:
            opt.zero_grad(set_to_none=True)  # also resets micro_step_id and the epilogue flag
            opt.grad_partitions_flat_buffer.zero_()
            opt.averaged_gradients = {}
            # The gradient-hook counters are reset only by forward(); without this the next
            # backward over the retained graph reuses the first one's counts, its epilogue
            # misses the last bucket, and those gradients are reduced again next step.
            opt.clear_backward_seen_flag()

    # --- public API ------------------------------------------------------------------------
    def backward(self, group_losses: dict[str, torch.Tensor]) -> None:
        """One backward per group for the micro-batch just forwarded; reduce and set aside."""
        if set(group_losses) != set(self.groups):
            raise ValueError(
                f"group losses {sorted(group_losses)} do not match the configured gradient "
                f"groups {self.groups} (model.groups)"
            )
        if self._summed:  # surgery none under offload: ordinary DeepSpeed accumulation
            self.engine.backward(sum(group_losses[g] for g in self.groups))
            self._micro += 1
            return
        t_n = len(self.groups)
        last_micro = self._micro == self.gas - 1
        if self.stage == 3 and self._micro == 0:
            # ZeRO-3 never clears its partition buffer after a step: the first backward of a
            # step *copies* over the slots of the params it reaches, and the others (a head the
            # group does not use) would keep the previous step's gradient.
            self.engine.optimizer.grad_partitions_flat_buffer.zero_()
        for t, g in enumerate(self.groups):
            self.engine.set_gradient_accumulation_boundary(True)  # reduce this group now
            with self._params_for_backward(t):
                self.engine.backward(group_losses[g], retain_graph=t < t_n - 1)
            if t == t_n - 1 and last_micro:
                break  # stays in DeepSpeed's buffer: step() combines into it
            t0 = time.perf_counter()
            slots = self._slots()
            bufs = self._buffers(slots)
            row = bufs[t]
            first = self._micro == 0
            for s in slots:
                dst = row.narrow(0, s.offset, s.view.numel())
                if first:
                    dst.copy_(s.view)
                else:
                    dst.add_(s.view)
            self._discard()
            self._overhead += time.perf_counter() - t0
        self._micro += 1

    def _params_for_backward(self, t: int):
        """ZeRO-3 re-gathers parameters only in the first backward through a graph (its
        pre-backward hooks run once; DeepSpeed#3539, fix PRs #8045/#8135 unmerged in 0.19.8), so
        later backward passes over the retained graph would see released (empty) weights. Gather
        them for those passes: the transient memory of the full parameters, as the PRs do."""
        if self.stage != 3 or t == 0:
            return contextlib.nullcontext()
        # lazy: deepspeed only in workers, see the module docstring
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # only the released ones: re-partitioning an available (persistent) parameter on exit
        # would leave its gradient hooks to add a stale gradient into the next step
        gone = [p for p in self._params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        return deepspeed.zero.GatheredParameters(gone) if gone else contextlib.nullcontext()

    def _buffers(self, slots: list[_Slot]) -> torch.Tensor:
        n = slots[-1].offset + slots[-1].view.numel() if slots else 0
        rows = len(self.groups) - (1 if self.gas == 1 else 0)
        if self._bufs is None or self._bufs.shape != (rows, n):
            ref = slots[0].view
            self._bufs = torch.zeros(rows, n, dtype=ref.dtype, device=ref.device)
            segs: list[tuple[int, int]] = []
            for s in slots:
                if not (s.shared and s.owned) or s.view.numel() == 0:
                    continue
                if segs and segs[-1][0] + segs[-1][1] == s.offset:
                    segs[-1] = (segs[-1][0], segs[-1][1] + s.view.numel())
                else:
                    segs.append((s.offset, s.view.numel()))
            self._segments = segs
        return self._bufs

    def step(
        self, step: int, *, defer: bool = False
    ) -> dict[str, float] | Callable[[], dict[str, float]]:
        """At the accumulation boundary: Gram, coefficients, fused combination, optimizer step.

        ``step`` is the index of this optimizer step in the run (the loop's counter, restored
        on resume): methods whose choice depends on it (PCGrad's visiting order) use it.

        Nothing here reads a tensor on the host: the Gram, the projection and the coefficients
        stay on the gradients' device (docs/design.md §5, the GPU step). The statistics are
        floats, so forming them is a synchronisation; with ``defer`` the step returns a function
        that forms them when called (the loop calls it on the steps it logs)."""
        if self._micro != self.gas:
            raise RuntimeError(
                f"step() after {self._micro} micro-batches; expected gradient_accumulation_steps"
                f" = {self.gas}"
            )
        if self._summed:
            self.engine.step()
            self._micro = 0
            summed = {"surgery/time_s": 0.0, "surgery/extra_bytes": 0.0}
            return (lambda: dict(summed)) if defer else summed
        t0 = time.perf_counter()
        t_n = len(self.groups)
        slots = self._slots()
        last = t_n - 1
        if t_n > 1 or self.gas > 1:
            bufs = self._buffers(slots)
            if self.gas > 1:  # fold the last group's earlier micro-batches into DeepSpeed's
                for s in slots:
                    s.view.add_(bufs[last].narrow(0, s.offset, s.view.numel()))
            held = bufs[:last]  # [T−1, n] groups 0..T−2
        else:
            held = None
        gram = self._gram(slots, held)
        proj = surgery.projection(self.mode, gram, self.groups, seed=self.seed, step=step)
        c = proj.sum(0)
        # One group (t_n == 1) has c = 1 under every method (P = I): nothing to combine.
        if held is not None and t_n > 1:
            # c cast to the gradient dtype, on its device (a tensor, not a Python float: beta=
            # of addmv_ would read it on the host, a synchronisation per step on a GPU)
            c_rest = c[:last].to(held.dtype).to(held.device)
            c_last = c[last].to(held.dtype).to(held.device)
            ones = torch.ones_like(c_rest)
            for s in slots:
                n = s.view.numel()
                if n == 0:
                    continue
                mat = held[:, s.offset : s.offset + n].t()  # [n, T−1]
                if s.shared:
                    s.view.mul_(c_last).addmv_(mat, c_rest)  # g = c_T g_T + Σ c_t g_t
                else:
                    s.view.addmv_(mat, ones)  # non-shared (heads): plain sum
        extra = 0 if self._bufs is None else self._bufs.numel() * self._bufs.element_size()
        n_local = sum(s.view.numel() for s in slots)
        overhead = self._overhead + time.perf_counter() - t0
        self.engine.step()
        self._micro, self._overhead = 0, 0.0
        if defer:
            return lambda: self._stats(gram, proj, c, overhead, extra, n_local)
        return self._stats(gram, proj, c, overhead, extra, n_local)

    def _gram(self, slots: list[_Slot], held: torch.Tensor | None) -> torch.Tensor:
        """All-reduced T×T Gram matrix of the global group gradients, accumulated in float64."""
        t_n = len(self.groups)
        dev = slots[0].view.device if slots else torch.device("cpu")
        gram = torch.zeros(t_n, t_n, dtype=torch.float64, device=dev)
        last = t_n - 1
        if held is not None and t_n > 1:
            for off, n in self._segments or []:
                blk = held[:, off : off + n]  # [T−1, n]
                gram[:last, :last] += gram64(blk, blk)
        for s in slots:
            if not (s.shared and s.owned) or s.view.numel() == 0:
                continue
            v = s.view.unsqueeze(0)  # [1, n]
            if held is not None and t_n > 1:
                gram[:last, last] += gram64(held[:, s.offset : s.offset + v.shape[1]], v)[:, 0]
            gram[last, last] += gram64(v, v)[0, 0]
        gram[last, :last] = gram[:last, last]
        if self._world > 1:
            dist.all_reduce(gram)
        return gram  # on the gradients' device: the coefficients are formed there too

    def _stats(self, gram, proj, c, overhead, extra, n_local) -> dict[str, float]:
        # the host copies, once: every statistic below is a float (a synchronisation on a GPU,
        # so the loop forms them only on the steps it logs)
        gram, proj, c = gram.cpu(), proj.cpu(), c.cpu()
        st: dict[str, float] = {}
        for k, g in enumerate(self.groups):
            st[surgery.norm_key(g)] = max(float(gram[k, k]), 0.0) ** 0.5
            st[surgery.coef_key(g)] = float(c[k])
        if len(self.groups) >= 2:
            st[surgery.COS_BEFORE] = surgery.cosine(gram, 0, 1)
            st["grad/conflict"] = float(gram[0, 1] < 0)
        st.update(surgery.combined_gram_stats(gram, proj))
        st["surgery/time_s"] = overhead
        st["surgery/extra_bytes"] = float(extra)
        st["surgery/partition_elems"] = float(n_local)
        elem = 4 if self._bufs is None else self._bufs.element_size()
        st["surgery/extra_over_partition"] = extra / max(1, n_local * elem)
        return st
