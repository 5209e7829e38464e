"""Cross-rank de-duplication's pure parts against hand calculations: the ownership plan (global
unique rows, shares, pads, remapped indices), the owner's auxiliary loss weights, and the
``data.dedup`` resolution per model and world size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtrec_dist.config import Config, ConfigError
from mtrec_dist.models.dedup import owned_sums, owner_weights, plan_exchange
from mtrec_dist.models.heads import ner_loss, news_class_loss
from mtrec_dist.models.registry import MODELS, global_dedup

# Two ranks. Row 0 is the pad title (masked slots point at it, count 0).
ROWS = [np.array([0, 3, 5, 9]), np.array([0, 5, 7])]
COUNTS = [np.array([0, 2, 1, 0]), np.array([0, 3, 1])]
# valid (category, ner, sentiment) per news row
VALID = {0: (0, 0, 0), 3: (1, 1, 0), 5: (0, 1, 1), 7: (1, 0, 0), 9: (1, 1, 1)}


def norms_by_hand() -> np.ndarray:
    # N_r,t = sum_u c_r(u) valid_t(u)
    # rank 0: cat 2*1 (row 3) = 2; ner 2 + 1 = 3; sentiment 1 (row 5)
    # rank 1: cat 1 (row 7) = 1; ner 3 (row 5) = 3; sentiment 3 (row 5)
    return np.array([[2.0, 3.0, 1.0], [1.0, 3.0, 3.0]])


def test_plan_by_hand():
    # U_g = [0, 3, 5, 7, 9], n = 5, S = ceil(5/2) = 3: rank 0 owns [0, 3, 5], rank 1 [7, 9, pad]
    p0, p1 = plan_exchange(ROWS, 0), plan_exchange(ROWS, 1)
    for p in (p0, p1):
        np.testing.assert_array_equal(p.rows, [0, 3, 5, 7, 9])
        assert p.share == 3
    np.testing.assert_array_equal(p0.owned, [0, 3, 5])
    np.testing.assert_array_equal(p1.owned, [7, 9, 0])
    assert (p0.start, p0.owned_real, p1.start, p1.owned_real) == (0, 3, 3, 2)
    np.testing.assert_array_equal(p0.remap, [0, 1, 2, 4])  # rows 0 3 5 9 -> U_g indices
    np.testing.assert_array_equal(p1.remap, [0, 2, 3])  # rows 0 5 7


def test_plan_more_ranks_than_titles():
    """Three ranks, two global titles: S = 1, the third rank encodes only a pad."""
    rows = [np.array([4]), np.array([4]), np.array([2])]
    plans = [plan_exchange(rows, r) for r in range(3)]
    assert [p.share for p in plans] == [1, 1, 1]
    assert [p.owned.tolist() for p in plans] == [[2], [4], [0]]
    assert [p.owned_real for p in plans] == [1, 1, 0]
    assert [p.remap.tolist() for p in plans] == [[1], [1], [0]]


def test_gathered_positions_are_global_indices():
    """Concatenating every rank's owned rows and dropping the tail gives U_g in order: the
    gathered vector of U_g[i] sits at position i (what gather_news_vectors relies on)."""
    rows = [np.array([1, 4, 6, 8, 11]), np.array([2, 4, 13]), np.array([6, 7])]
    plans = [plan_exchange(rows, r) for r in range(3)]
    cat = np.concatenate([p.owned for p in plans])
    np.testing.assert_array_equal(cat[: plans[0].rows.size], plans[0].rows)
    for r, p in enumerate(plans):  # every rank's remap points at its own rows
        np.testing.assert_array_equal(cat[p.remap], rows[r])


def test_owner_weights_by_hand():
    norms = norms_by_hand()
    w0 = owner_weights(
        plan_exchange(ROWS, 0), ROWS, COUNTS, norms, np.array([VALID[r] for r in (0, 3, 5)])
    )
    w1 = owner_weights(
        plan_exchange(ROWS, 1), ROWS, COUNTS, norms, np.array([VALID[r] for r in (7, 9, 0)])
    )
    # row 3: rank 0 only, c = 2 -> (2/2, 2/3, 2/1) * valid (1, 1, 0)
    # row 5: rank 0 c = 1 -> (1/2, 1/3, 1/1); rank 1 c = 3 -> (3/1, 3/3, 3/3); * (0, 1, 1)
    # row 7: rank 1 c = 1 -> (1/1, 1/3, 1/3) * (1, 0, 0); row 9: count 0; row 0 and pad: 0
    np.testing.assert_allclose(w0, [[0, 0, 0], [1, 2 / 3, 0], [0, 4 / 3, 2]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(w1, [[1, 0, 0], [0, 0, 0], [0, 0, 0]], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(
        owned_sums(plan_exchange(ROWS, 0), ROWS, COUNTS), [0, 2, 4]
    )  # occurrences over ranks of the owned rows


@pytest.mark.parametrize("ner_reduction", ["sum", "mean"])
def test_owner_weighted_losses_sum_to_per_rank_losses(ner_reduction):
    """sum over owners of the weighted losses == sum over ranks of the per-rank losses, per
    task, on random logits (the heads' own loss functions on both sides; NER reduced per title
    either way, model.ner_reduction)."""
    g = torch.Generator().manual_seed(0)
    rows_all = [0, 3, 5, 7, 9]
    logits = {r: torch.randn(4, generator=g, dtype=torch.float64) for r in rows_all}
    tags = {r: torch.randint(0, 3, (5,), generator=g) for r in rows_all}
    for r in rows_all:  # NER valid = at least one tagged token
        if not VALID[r][1]:
            tags[r][:] = -100
    target = {r: 1 + r % 3 for r in rows_all}
    tok = {r: torch.randn(5, 3, generator=g, dtype=torch.float64) for r in rows_all}

    def losses(rows, count, weight=None):
        valid = torch.tensor([VALID[int(r)] for r in rows], dtype=torch.bool)
        lg = torch.stack([logits[int(r)] for r in rows])
        tg = torch.tensor([target[int(r)] for r in rows])
        c = torch.as_tensor(count, dtype=torch.float64)
        w = [None] * 3 if weight is None else [torch.as_tensor(weight[:, t]) for t in range(3)]
        return [
            news_class_loss(lg, tg, c, valid[:, 0], w[0]),
            ner_loss(
                torch.stack([tok[int(r)] for r in rows]),
                torch.stack([tags[int(r)] for r in rows]),
                c,
                w[1],
                ner_reduction,
            ),
            news_class_loss(lg, tg, c, valid[:, 2], w[2]),
        ]

    per_rank = [sum(x) for x in zip(*(losses(ROWS[r], COUNTS[r]) for r in range(2)))]
    owners = []
    for r in range(2):
        p = plan_exchange(ROWS, r)
        valid = np.array([VALID[int(x)] for x in p.owned])
        w = owner_weights(p, ROWS, COUNTS, norms_by_hand(), valid)
        owners.append(losses(p.owned, np.zeros(p.share), w))
    global_ = [sum(x) for x in zip(*owners)]
    for a, b in zip(per_rank, global_):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dedup_resolution():
    cfg = Config()
    assert global_dedup(cfg, 2) is True  # auto, MTRec, 2 workers
    assert global_dedup(cfg, 1) is False  # auto, one worker: nothing to exchange
    cfg.data.dedup = "rank"
    assert global_dedup(cfg, 4) is False
    cfg.data.dedup = "auto"
    cfg.model.name = "unbert"  # cross-encoder: auto falls back to per rank
    assert global_dedup(cfg, 4) is False
    cfg.data.dedup = "global"
    with pytest.raises(
        ConfigError, match=r"data\.dedup=global: model\.name=unbert.*data\.dedup=rank"
    ):
        global_dedup(cfg, 4)
    cfg.model.name = "miner"  # bi-encoder: global is allowed, and auto picks it at world > 1
    assert global_dedup(cfg, 4) is True
    cfg.data.dedup = "auto"
    assert global_dedup(cfg, 2) is True and global_dedup(cfg, 1) is False
    bi = [n for n, c in MODELS.items() if getattr(c, "global_dedup", False)]
    assert bi == ["mtrec", "bert", "mtrec_amf", "bert_amf", "nrms_bert", "lstur_bert", "miner"]


def test_dedup_key_is_validated():
    from mtrec_dist.config import load_config

    assert load_config(None, []).data.dedup == "auto"
    with pytest.raises(ConfigError, match=r"data\.dedup='everywhere': allowed values are auto"):
        load_config(None, ["data.dedup=everywhere"])
