"""The Gram matrix of the fused surgery is accumulated in float64 (22M elements: MiniLM)."""

from types import SimpleNamespace

import pytest
import torch

from mtrec_dist.train.ds_engine import MultiTaskGradients, _Slot

N = 22_000_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_of_22m_elements_matches_a_float64_reference(dtype):
    g = torch.Generator().manual_seed(0)
    # group gradients as DeepSpeed holds them: [T-1, n] set aside, the last one in its buffer
    held = (torch.randn(2, N, generator=g) * 1e-3 + 2e-4).to(dtype)
    last = (torch.randn(N, generator=g) * 1e-3 - 1e-4).to(dtype)
    slots = [_Slot(last[: N // 2], 0, True, True), _Slot(last[N // 2 :], N // 2, True, True)]
    fake = SimpleNamespace(groups=["a", "b", "c"], _segments=[(0, N)], _world=1)
    got = MultiTaskGradients._gram(fake, slots, held)
    m = torch.cat([held, last[None]]).double()  # the same values, exactly, in float64
    ref = m @ m.t()
    rel = ((got - ref).abs() / ref.abs()).max().item()
    assert got.dtype == torch.float64 and rel <= 1e-9, rel
