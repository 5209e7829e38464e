"""Surgery coefficients (from the Gram matrix) == surgery written out with flat vectors."""

from __future__ import annotations

import pytest
import torch

from mtrec_dist.train import surgery
from tests.surgery_reference import pcgrad_projected


def gram_of(vecs: list[torch.Tensor]) -> torch.Tensor:
    m = torch.stack(vecs).double()
    return m @ m.T


def combine(c: torch.Tensor, vecs: list[torch.Tensor]) -> torch.Tensor:
    return sum(float(ci) * v.double() for ci, v in zip(c, vecs))


def mtrec_explicit(gm: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
    """MTRec eq. 10 applied both ways with explicit vectors, then summed."""
    gm, ga = gm.double(), ga.double()
    d = gm @ ga
    if d < 0:
        return (gm - d / (ga @ ga) * ga) + (ga - d / (gm @ gm) * gm)
    return gm + ga


def pcgrad_explicit(vecs: list[torch.Tensor], seed: int, step: int) -> torch.Tensor:
    """Yu et al. 2020, Algorithm 1, with explicit vectors and the same seeded order."""
    return sum(pcgrad_projected([v.double() for v in vecs], seed, step))


def test_mtrec_hand_made_conflict():
    # g_m = [1, 0], g_a = [-1, 1]: d = -1, ‖g_m‖² = 1, ‖g_a‖² = 2
    # g_m' = [1,0] + 1/2 [-1,1] = [0.5, 0.5];  g_a' = [-1,1] + 1 [1,0] = [0, 1]
    gm, ga = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    c = surgery.coefficients("mtrec", gram_of([gm, ga]), ["main", "aux"])
    assert c.tolist() == pytest.approx([2.0, 1.5])  # (1 - d/‖g_m‖², 1 - d/‖g_a‖²)
    assert combine(c, [gm, ga]).tolist() == pytest.approx([0.5, 1.5])


def test_aux_only_hand_made_conflict():
    # only g_a is projected: g_a' = [0, 1]; g = [1, 0] + [0, 1]
    gm, ga = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    c = surgery.coefficients("aux_only", gram_of([gm, ga]), ["main", "aux"])
    assert c.tolist() == pytest.approx([2.0, 1.0])
    assert combine(c, [gm, ga]).tolist() == pytest.approx([1.0, 1.0])


def test_main_found_by_name_not_position():
    gm, ga = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    c = surgery.coefficients("aux_only", gram_of([ga, gm]), ["aux", "main"])
    assert c.tolist() == pytest.approx([1.0, 2.0])


@pytest.mark.parametrize("mode", ["mtrec", "aux_only", "pcgrad", "none"])
def test_orthogonal_and_zero_gradients_are_left_alone(mode):
    e1, e2, z = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0]), torch.zeros(2)
    for pair in ([e1, e2], [e1, z], [z, e2], [z, z]):
        c = surgery.coefficients(mode, gram_of(pair), ["main", "aux"])
        assert c.tolist() == [1.0, 1.0]
        assert torch.isfinite(c).all()


def test_mtrec_random_against_flat_vectors():
    g = torch.Generator().manual_seed(0)
    conflicts = 0
    for _ in range(200):
        gm, ga = torch.randn(50, generator=g), torch.randn(50, generator=g)
        c = surgery.coefficients("mtrec", gram_of([gm, ga]), ["main", "aux"])
        torch.testing.assert_close(combine(c, [gm, ga]), mtrec_explicit(gm, ga))
        conflicts += int(gm @ ga < 0)
    assert 50 < conflicts < 150  # both branches exercised


@pytest.mark.parametrize("t", [2, 3, 4])
def test_pcgrad_random_against_flat_vectors(t):
    g = torch.Generator().manual_seed(t)
    for step in range(100):
        base = torch.randn(8, generator=g)
        vecs = [torch.randn(8, generator=g) - 0.5 * base * (k % 2) for k in range(t)]
        c = surgery.coefficients(
            "pcgrad", gram_of(vecs), [f"g{k}" for k in range(t)], seed=3, step=step
        )
        torch.testing.assert_close(combine(c, vecs), pcgrad_explicit(vecs, 3, step))


def test_pcgrad_hand_made_three_tasks():
    # g1 = [1, 0], g2 = [-1, 1], g3 = [0, -1]; for two tasks PCGrad equals MTRec's two-way rule
    vecs = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([0.0, -1.0])]
    c = surgery.coefficients("pcgrad", gram_of(vecs), ["a", "b", "c"], seed=0, step=0)
    torch.testing.assert_close(combine(c, vecs), pcgrad_explicit(vecs, 0, 0))
    two = surgery.coefficients("pcgrad", gram_of(vecs[:2]), ["main", "aux"])
    assert combine(two, vecs[:2]).tolist() == pytest.approx([0.5, 1.5])


def test_pcgrad_order_depends_on_seed_and_step_only():
    assert surgery.pcgrad_order(5, 1, 2) == surgery.pcgrad_order(5, 1, 2)
    orders = {str(surgery.pcgrad_order(5, 1, s)) for s in range(10)}
    assert len(orders) > 1
    for i, order in enumerate(surgery.pcgrad_order(5, 1, 2)):
        assert sorted(order) == [j for j in range(5) if j != i]


def test_none_is_plain_sum():
    vecs = [torch.randn(5) for _ in range(3)]
    c = surgery.coefficients("none", gram_of(vecs), ["a", "b", "c"])
    assert c.tolist() == [1.0, 1.0, 1.0]


def test_cosines_before_and_after():
    gm, ga = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    gram = gram_of([gm, ga])
    assert surgery.cosine(gram, 0, 1) == pytest.approx(-(0.5**0.5))
    proj = surgery.projection("mtrec", gram, ["main", "aux"])
    st = surgery.combined_gram_stats(gram, proj)
    # projected: g_m' = [0.5, 0.5], g_a' = [0, 1] -> cos = 0.5 / (sqrt(0.5) * 1)
    assert st[surgery.COS_AFTER] == pytest.approx(0.5 / 0.5**0.5)
    g = torch.tensor([0.5, 1.5])  # combined
    assert st["grad/norm_combined"] == pytest.approx(float(g.norm()))
    assert st["grad/cos_combined_0"] == pytest.approx(float(g @ gm / g.norm()))
    assert surgery.cosine(torch.zeros(2, 2), 0, 1) == 0.0


def test_unknown_mode_and_wrong_shapes_raise():
    gram = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="allowed: none, mtrec, pcgrad, aux_only"):
        surgery.coefficients("graddrop", gram, ["main", "aux"])
    with pytest.raises(ValueError, match="exactly 2 gradient groups"):
        surgery.coefficients("mtrec", torch.eye(3, dtype=torch.float64), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[T, T\]"):
        surgery.coefficients("none", gram, ["main"])
