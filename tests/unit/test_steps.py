"""One step plan for every trainer: B // accumulation steps per epoch, leftovers dropped."""

import pytest

from mtrec_dist.train.steps import StepPlan, epoch_micro_batches, step_plan


@pytest.mark.parametrize(
    "batches,accum,epochs,max_steps,per_epoch,used,total",
    [
        (56, 5, 2, 0, 11, 55, 22),  # 1 micro-batch dropped per epoch
        (56, 4, 2, 0, 14, 56, 28),
        (27, 2, 3, 0, 13, 26, 39),
        (27, 2, 3, 30, 13, 26, 30),  # max_steps caps the total
        (27, 1, 2, 100, 27, 27, 54),  # a cap above the total changes nothing
    ],
)
def test_plan_arithmetic(batches, accum, epochs, max_steps, per_epoch, used, total):
    p = StepPlan(batches, accum, epochs, max_steps)
    assert (p.steps_per_epoch, p.used_per_epoch, p.total_steps) == (per_epoch, used, total)


def test_epoch_micro_batches_drops_the_leftover_and_honours_a_skip():
    p = StepPlan(7, 3, 1, 0)
    assert list(epoch_micro_batches(range(7), p)) == [0, 1, 2, 3, 4, 5]
    # a loader resumed after 3 consumed batches yields the rest of the stream (3..6)
    assert list(epoch_micro_batches(range(3, 7), p, skip=3)) == [3, 4, 5]


def test_step_plan_matches_the_loader_and_refuses_an_empty_epoch(tiny_cfg):
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.data.stream import loader_for

    cfg = tiny_cfg("trainer.grad_accum=5", "trainer.epochs=2", "trainer.max_steps=0")
    manifest = load_manifest(cfg.prepared_dir)
    plan = step_plan(manifest, 1, cfg.trainer)
    n = sum(1 for _ in loader_for(cfg, rank=0, world_size=1, epoch=0))
    assert plan.batches_per_epoch == n
    assert plan.total_steps == 2 * (n // 5)
    cfg.trainer.grad_accum = n + 1
    with pytest.raises(
        ValueError, match=rf"{n} micro-batches per epoch .* trainer.grad_accum={n + 1}"
    ):
        step_plan(manifest, 1, cfg.trainer)
