"""Step counting: how many optimizer steps an epoch holds, and what happens to the rest
(docs/design.md §5 Steps and epochs).

One rule for every trainer (the distributed loop, the single-process reference, the tuner and
the start-up summary): an epoch of ``B`` micro-batches per rank gives ``B // grad_accum``
optimizer steps, and the ``B % grad_accum`` leftover micro-batches at the end of the epoch are
**dropped** (the accumulation analogue of ``drop_last``). So every optimizer step sees exactly
``grad_accum`` micro-batches of one epoch, the step counter and the data position agree at
every epoch boundary, and a resume never has to carry a half-accumulated step across epochs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

from mtrec_dist.data.stream import batches_per_epoch

T = TypeVar("T")


@dataclass(frozen=True)
class StepPlan:
    """The step arithmetic of one run, for ``world_size`` ranks."""

    batches_per_epoch: int  # micro-batches every rank's loader yields per epoch
    grad_accum: int  # micro-batches per optimizer step per rank
    epochs: int
    max_steps: int  # 0 = no cap

    @classmethod
    def of(cls, manifest: Any, world_size: int, trainer: Any) -> StepPlan:
        """The plan of ``trainer`` (a ``TrainerConfig``) over the prepared ``manifest``."""
        t = trainer
        n = batches_per_epoch(manifest, world_size, t.micro_batch, t.seed, 0)
        return cls(n, t.grad_accum, t.epochs, t.max_steps)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: full accumulation windows only."""
        return self.batches_per_epoch // self.grad_accum

    @property
    def used_per_epoch(self) -> int:
        """Micro-batches of an epoch that go into optimizer steps (the rest are dropped)."""
        return self.steps_per_epoch * self.grad_accum

    @property
    def total_steps(self) -> int:
        steps = self.steps_per_epoch * self.epochs
        return min(steps, self.max_steps) if self.max_steps > 0 else steps


def step_plan(manifest: Any, world_size: int, trainer: Any) -> StepPlan:
    """The StepPlan of ``trainer`` (a ``TrainerConfig``) over the prepared ``manifest``.

    Raises ``ValueError`` naming the keys when an epoch is shorter than one optimizer step."""
    t = trainer
    plan = StepPlan.of(manifest, world_size, t)
    n = plan.batches_per_epoch
    if plan.steps_per_epoch < 1:
        raise ValueError(
            f"{n} micro-batches per epoch per worker (trainer.micro_batch={t.micro_batch}, "
            f"{world_size} worker(s)) give no optimizer step with trainer.grad_accum="
            f"{t.grad_accum}; lower them"
        )
    return plan


def epoch_micro_batches(loader: Iterable[T], plan: StepPlan, skip: int = 0) -> Iterator[T]:
    """The micro-batches of an epoch that go into optimizer steps, ``skip`` of them already
    consumed (a resume mid-epoch: the loader was built to skip them)."""
    return islice(loader, max(0, plan.used_per_epoch - skip))
