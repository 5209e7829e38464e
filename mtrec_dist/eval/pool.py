"""Evaluation workers: one :class:`~mtrec_dist.eval.engine.Engine` in this process, or several
as Ray actors dealt work by Ray's own ``ray.util.ActorPool``.

Ray is started here (a local instance, CPUs capped to the workers asked for) only when no Ray
is running; on a running cluster with fewer CPUs than workers each actor asks for a fraction of
a CPU. Every actor computes with one torch thread, so results do not depend on the workers.
Workers start on the first call that has work: a restarted run whose parts are all done starts
none; ``broadcast`` calls made before that are replayed on the new workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mtrec_dist.eval.engine import Engine
from mtrec_dist.eval.run_folder import load_run
from mtrec_dist.utils import ray_address


class EngineActor(Engine):
    """The Ray actor: builds the model from the run folder itself (one torch thread)."""

    def __init__(self, run_dir: str, split: str):
        torch.set_num_threads(1)
        model, cfg, _, _ = load_run(run_dir)
        super().__init__(model, cfg.prepared_dir, split)

    def call(self, i: int, method: str, args: tuple) -> tuple[int, Any]:
        """``(i, method(*args))``: the work unit's index travels with its result."""
        return i, getattr(self, method)(*args)


class WorkerPool:
    """Runs Engine methods on the workers; ``map`` yields results in completion order."""

    def __init__(self, n: int, run_dir: Path | None, split: str, local: Callable[[], Engine]):
        """``n`` workers; with ``n == 1`` the engine built by ``local()`` in this process."""
        self.n, self.run_dir, self.split, self.make_local = n, run_dir, split, local
        self.local: Engine | None = None
        self.actors: list = []
        self.started = self.started_ray = False
        self.pending: list[tuple[str, tuple]] = []

    @classmethod
    def in_process(cls, engine: Engine) -> WorkerPool:
        """A pool of one: ``engine`` itself (the trainer's in-memory evaluation)."""
        return cls(1, None, engine.split, lambda: engine)

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        if self.n == 1:
            self.local = self.make_local()
        else:
            self.actors = self._start_actors()
        for method, args in self.pending:
            self.broadcast(method, *args)

    def _start_actors(self) -> list:
        import ray

        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": ray_address(), "include_dashboard": False}
            if not os.environ.get("RAY_ADDRESS"):
                kw["num_cpus"] = min(self.n, os.cpu_count() or 1)
            pkg_root = str(Path(__file__).resolve().parents[2])
            kw["runtime_env"] = {"env_vars": {"PYTHONPATH": pkg_root, "MTREC_QUIET": "1"}}
            ray.init(**kw)
            self.started_ray = True
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        actor = ray.remote(num_cpus=min(1.0, cpus / self.n))(EngineActor)
        return [actor.remote(str(self.run_dir), self.split) for _ in range(self.n)]

    def map(self, method: str, arglists: list[tuple]) -> Iterator[tuple[int, Any]]:
        """Yield ``(i, result)`` of ``method(*arglists[i])`` as each finishes."""
        if not arglists:
            return
        self._start()
        if self.local is not None:
            fn = getattr(self.local, method)
            for i, args in enumerate(arglists):
                yield i, fn(*args)
            return
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        work = list(enumerate(arglists))
        yield from pool.map_unordered(lambda a, v: a.call.remote(v[0], method, v[1]), work)

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every started worker; their results (none before a start)."""
        if not self.started:
            self.pending.append((method, args))
            return []
        if self.local is not None:
            return [getattr(self.local, method)(*args)]
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by this process plus every started Ray worker (a worker
        in this process is this process): differences give a stage's CPU time."""
        own = Engine.cpu_seconds()
        if not self.actors:
            return own
        import ray

        return own + sum(ray.get([a.cpu_seconds.remote() for a in self.actors]))

    def close(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
            self.actors = []
            if self.started_ray:
                ray.shutdown()
