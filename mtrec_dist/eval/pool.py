"""Evaluation workers: one :class:`~mtrec_dist.eval.engine.Engine` in this process, or several
as Ray actors dealt work by Ray's own ``ray.util.ActorPool`` (docs/design.md §8.1).

Ray is started here (a local instance, CPUs capped to the workers asked for) only when no Ray
is running; on a running cluster with fewer CPUs than workers each actor asks for a fraction of
a CPU. Every actor computes with one torch thread, so results do not depend on the workers.

Devices (docs/design.md §8.5): ``eval.device`` resolves to ``cpu`` or ``cuda``
(:func:`resolve_device`); on ``cuda`` there is one worker per GPU of the node
(:func:`device_workers`), each actor holding one GPU (:func:`actor_options`), and a node with
one GPU runs the engine in this process on that GPU, without Ray.
Workers start on the first call that has work: a restarted run whose parts are all done starts
none; :meth:`WorkerPool.set_vectors` calls made before that are replayed on the new workers.

The pool's methods are the work the driver deals out, one per :class:`Engine` method; each
names the engine method it runs (``Engine.encode``, ...), which an actor calls on itself
(:meth:`EngineActor.call`), so a renamed engine method is an error where it is named, not a
string that fails on a worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrec_dist.config import ConfigError
from mtrec_dist.eval.engine import Engine, PartSpec
from mtrec_dist.eval.run_folder import load_run
from mtrec_dist.utils import ray_address

EngineFn = Callable[..., Any]  # an Engine method taken from the class: fn(engine, *args)
CPU, CUDA = "cpu", "cuda"


def resolve_device(setting: str) -> str:
    """``eval.device`` -> ``"cpu"`` or ``"cuda"`` (docs/design.md §8.5): ``auto`` takes the
    node's GPUs when CUDA is there, so ``mtrec predict`` on a GPU node uses them unasked;
    ``cuda`` where there is none is a mistake to name, not a silent fall back to CPU."""
    if setting == "auto":
        return CUDA if torch.cuda.is_available() else CPU
    if setting == CUDA and not torch.cuda.is_available():
        raise ConfigError(
            "eval.device=cuda: torch.cuda.is_available() is False on this node (no GPU, or a "
            "CPU-only torch): set eval.device=auto or eval.device=cpu, or run on a GPU node"
        )
    if setting not in (CPU, CUDA):
        raise ConfigError(f"eval.device={setting!r}: expected one of auto, cpu, cuda")
    return setting


def device_workers(device: str, num_workers: int) -> int:
    """Workers for ``device``: on ``cuda`` one per GPU of the node (each encodes and scores
    whole chunks on its own GPU; a second worker on a GPU would only share it), on ``cpu``
    ``num_workers`` (``eval.num_workers`` / ``--workers``) as before."""
    if device == CUDA:
        return max(1, torch.cuda.device_count())
    return max(1, int(num_workers))


def actor_options(device: str, n: int, cluster_cpus: float) -> dict[str, float]:
    """Ray resources of each of ``n`` actors: a CPU each, or an equal share of the cluster's
    CPUs where it has fewer than ``n`` (as before), and on ``cuda`` one whole GPU each, so Ray
    places one actor per GPU and sets its ``CUDA_VISIBLE_DEVICES``."""
    opts = {"num_cpus": min(1.0, cluster_cpus / n)}
    if device == CUDA:
        opts["num_gpus"] = 1
    return opts


class EngineActor(Engine):
    """The Ray actor: builds the model from the run folder itself (one torch thread), on
    ``device`` (its own GPU on ``cuda``: Ray made it the only visible one)."""

    def __init__(self, run_dir: str, split: str, device: str = CPU, bf16: bool = False):
        torch.set_num_threads(1)
        model, cfg, _, _ = load_run(run_dir)
        super().__init__(model.to(device), cfg.prepared_dir, split, bf16=bf16)

    def call(self, i: int, fn: EngineFn, args: tuple) -> tuple[int, Any]:
        """``(i, fn(self, *args))``: the work unit's index travels with its result (Ray's
        ``map_unordered`` returns results in completion order)."""
        return i, fn(self, *args)


class WorkerPool:
    """Runs Engine methods on the workers; the maps yield ``(i, result)`` of work unit ``i``
    in completion order."""

    def __init__(
        self,
        n: int,
        run_dir: Path | None,
        split: str,
        local: Callable[[], Engine],
        device: str = CPU,
        bf16: bool = False,
    ):
        """``n`` workers; with ``n == 1`` the engine built by ``local()`` in this process.
        ``device`` and ``bf16`` are the actors' (:class:`EngineActor`); ``local()`` places
        its own engine."""
        self.n, self.run_dir, self.split, self.make_local = n, run_dir, split, local
        self.device, self.bf16 = device, bf16
        self.local: Engine | None = None
        self.actors: list = []
        self.started = self.started_ray = False
        self.vectors_path: str | None = None  # replayed on workers started later

    @classmethod
    def in_process(cls, engine: Engine) -> WorkerPool:
        """A pool of one: ``engine`` itself (the trainer's in-memory evaluation)."""
        return cls(1, None, engine.split, lambda: engine)

    # ------------------------------------------------------------------ the work

    def index_shards(self, shards: Iterable[int]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """:meth:`Engine.index_shard` of each shard; ``i`` is the shard's position."""
        return self._map(Engine.index_shard, [(k,) for k in shards])

    def encode(
        self, chunks: list[np.ndarray]
    ) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
        """:meth:`Engine.encode` of each chunk of news rows."""
        return self._map(Engine.encode, [(c,) for c in chunks])

    def score_parts_to(
        self, parts: list[tuple[PartSpec, bool, str, str]]
    ) -> Iterator[tuple[int, int]]:
        """:meth:`Engine.score_part_to` of each ``(spec, labeled, path, key)``."""
        return self._map(Engine.score_part_to, parts)

    def set_vectors(self, path: str) -> None:
        """Every worker, started or to come, memory-maps the news vectors at ``path``."""
        self.vectors_path = path
        if self.started:
            self._each(Engine.set_vectors, path)

    def peak_rss_mb(self) -> list[float]:
        """Each started worker's peak resident memory (MiB); none before a start."""
        if not self.started:
            return []
        if self.local is not None:
            return [self.local.peak_rss_mb()]
        ray = _ray()
        return ray.get([a.peak_rss_mb.remote() for a in self.actors])

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by this process plus every started Ray worker (a worker
        in this process is this process): differences give a stage's CPU time."""
        own = Engine.cpu_seconds()
        if not self.actors:
            return own
        ray = _ray()
        return own + sum(ray.get([a.cpu_seconds.remote() for a in self.actors]))

    def close(self) -> None:
        if self.actors:
            ray = _ray()
            for a in self.actors:
                ray.kill(a)
            self.actors = []
            if self.started_ray:
                ray.shutdown()

    # ------------------------------------------------------------------ dealing it out

    def _map(self, fn: EngineFn, arglists: list[tuple]) -> Iterator[tuple[int, Any]]:
        """Yield ``(i, fn(worker, *arglists[i]))`` as each finishes."""
        if not arglists:
            return
        self._start()
        if self.local is not None:
            for i, args in enumerate(arglists):
                yield i, fn(self.local, *args)
            return
        pool = _ray().util.ActorPool(self.actors)
        work = list(enumerate(arglists))
        yield from pool.map_unordered(lambda a, v: a.call.remote(v[0], fn, v[1]), work)

    def _each(self, fn: EngineFn, *args: Any) -> list[Any]:
        """``fn(worker, *args)`` on every started worker; their results."""
        if self.local is not None:
            return [fn(self.local, *args)]
        ray = _ray()
        return [r for _, r in ray.get([a.call.remote(0, fn, args) for a in self.actors])]

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        if self.n == 1:
            self.local = self.make_local()
        else:
            self.actors = self._start_actors()
        if self.vectors_path is not None:
            self._each(Engine.set_vectors, self.vectors_path)

    def _start_actors(self) -> list:
        ray = _ray()
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": ray_address(), "include_dashboard": False}
            if not os.environ.get("RAY_ADDRESS"):
                kw["num_cpus"] = min(self.n, os.cpu_count() or 1)
            pkg_root = str(Path(__file__).resolve().parents[2])
            kw["runtime_env"] = {"env_vars": {"PYTHONPATH": pkg_root, "MTREC_QUIET": "1"}}
            ray.init(**kw)
            self.started_ray = True
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        actor = ray.remote(**actor_options(self.device, self.n, cpus))(EngineActor)
        args = (str(self.run_dir), self.split, self.device, self.bf16)
        return [actor.remote(*args) for _ in range(self.n)]


def _ray() -> Any:
    """Ray, imported on first use on purpose: it takes seconds to import and only a pool of
    several workers needs it (one worker, the trainer's evaluation and the tests run without)."""
    import ray  # brings ray.util.ActorPool

    return ray
