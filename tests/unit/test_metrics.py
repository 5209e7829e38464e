"""Metrics against hand calculations, sklearn's roc_auc_score and MIND's own evaluate.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mtrec_dist.metrics import (
    compute_metrics,
    impression_metrics,
    ranked_impression_metrics,
    ranked_metrics,
    stable_ranks,
)
from tests.oracles import compute_metrics_lists

L2 = math.log2


# ------------------------------------------------------------------ MIND's evaluate.py, transcribed
def mind_dcg_score(y_true, y_score, k=10):
    order = np.argsort(y_score)[::-1]
    y_true = np.take(y_true, order[:k])
    gains = 2**y_true - 1
    discounts = np.log2(np.arange(len(y_true)) + 2)
    return np.sum(gains / discounts)


def mind_ndcg_score(y_true, y_score, k=10):
    best = mind_dcg_score(y_true, y_true, k)
    actual = mind_dcg_score(y_true, y_score, k)
    return actual / best


def mind_mrr_score(y_true, y_score):
    order = np.argsort(y_score)[::-1]
    y_true = np.take(y_true, order)
    rr_score = y_true / (np.arange(len(y_true)) + 1)
    return np.sum(rr_score) / np.sum(y_true)


def one(labels, scores):
    """Metrics row of a single impression: (auc, mrr, ndcg@5, ndcg@10)."""
    return impression_metrics(np.array(labels), np.array(scores), np.array([len(labels)]))[0]


# ------------------------------------------------------------------ hand-computed values
def test_single_click_ranked_first():
    # clicked c1 has the top score: both (pos, neg) pairs correct -> AUC 2/2 = 1; rank 1 -> MRR 1/1,
    # DCG = 1/log2(2) = 1 = ideal -> nDCG 1.
    np.testing.assert_allclose(one([0, 1, 0], [0.1, 0.9, 0.5]), [1.0, 1.0, 1.0, 1.0])


def test_two_clicks_ranked_last():
    # order by score: c1 (0.8), c2 (0.5), c0 (0.2), c3 (0.1); clicks c0, c3 at ranks 3 and 4.
    # AUC: 4 (pos, neg) pairs, all wrong -> 0/4 = 0.
    # MRR = (1/3 + 1/4) / 2 = 7/24.
    # DCG@5 = 1/log2(4) + 1/log2(5); ideal = 1/log2(2) + 1/log2(3).
    dcg = 1 / L2(4) + 1 / L2(5)
    ideal = 1 / L2(2) + 1 / L2(3)
    np.testing.assert_allclose(
        one([1, 0, 0, 1], [0.2, 0.8, 0.5, 0.1]), [0.0, 7 / 24, dcg / ideal, dcg / ideal]
    )


def test_ties_half_credit_in_auc_and_candidate_order_in_ranks():
    # c0 (clicked) ties with c1: AUC = (1/2 + 1) / 2 = 3/4. Stable rank: c0 first -> rank 1.
    np.testing.assert_allclose(one([1, 0, 0], [0.5, 0.5, 0.1]), [0.75, 1.0, 1.0, 1.0])
    # clicked c1 ties with c0 and comes after it: rank 2 -> MRR 1/2, nDCG = (1/log2(3)) / 1.
    np.testing.assert_allclose(one([0, 1, 0], [0.5, 0.5, 0.1]), [0.75, 0.5, 1 / L2(3), 1 / L2(3)])
    # all scores equal, 2 pos 2 neg: 4 tied pairs -> AUC 4 * 1/2 / 4 = 1/2; clicks c2, c3 at ranks
    # 3 and 4 -> MRR = (1/3 + 1/4) / 2 = 7/24.
    row = one([0, 0, 1, 1], [1.0, 1.0, 1.0, 1.0])
    assert row[0] == pytest.approx(0.5) and row[1] == pytest.approx(7 / 24)


def test_ndcg_cutoff():
    # 12 candidates, the only click ranked 7th: nDCG@5 = 0, nDCG@10 = (1/log2(8)) / 1 = 1/3,
    # MRR = 1/7; 5 of the 11 negatives score below the click -> AUC = 5/11.
    scores = np.arange(12, 0, -1, dtype=float)  # candidate i has rank i+1
    labels = np.zeros(12)
    labels[6] = 1
    np.testing.assert_allclose(one(labels, scores), [5 / 11, 1 / 7, 0.0, 1 / 3])


def test_all_negative_and_all_positive_impressions_are_counted():
    # all positive: no AUC; MRR = (1/1 + 1/2) / 2 = 3/4; nDCG = ideal/ideal = 1.
    row = one([1, 1], [0.3, 0.1])
    assert math.isnan(row[0])
    np.testing.assert_allclose(row[1:], [0.75, 1.0, 1.0])
    # all negative: nothing defined.
    assert np.isnan(one([0, 0], [0.1, 0.2])).all()

    # averages over the defined impressions only:
    # auc over {[0,1,0] -> 1, [1,0,0,1] -> 0} = 1/2; mrr over {1, 7/24, 3/4} = (24+7+18)/72 = 49/72
    res = compute_metrics_lists(
        [[0, 1, 0], [1, 0, 0, 1], [0, 0], [1, 1]],
        [[0.1, 0.9, 0.5], [0.2, 0.8, 0.5, 0.1], [0.1, 0.2], [0.3, 0.1]],
    )
    assert res["auc"] == pytest.approx(0.5)
    assert res["mrr"] == pytest.approx(49 / 72)
    assert (res["impressions"], res["auc_skipped"], res["no_click_skipped"]) == (4, 2, 1)


def test_stable_ranks_ties_by_candidate_order():
    r = stable_ranks(np.array([[0.2, 0.9, 0.2, 0.9, -np.inf]]))
    assert r.tolist() == [[3, 1, 4, 2, 5]]


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        one([1, 0], [np.nan, 0.0])
    with pytest.raises(ValueError, match="sum of sizes"):
        impression_metrics(np.zeros(3), np.zeros(3), np.array([2]))


# ------------------------------------------------------------------ cross-checks
def _random_impressions(rng, n, ties):
    labels, scores = [], []
    for _ in range(n):
        c = int(rng.integers(2, 30))
        y = (rng.random(c) < 0.2).astype(int)
        if rng.random() < 0.9:  # mostly >= 1 click and >= 1 non-click
            y[rng.integers(c)] = 1
            y[rng.integers(c)] = 0
        s = rng.integers(0, 4, c).astype(float) if ties else rng.standard_normal(c)
        labels.append(y)
        scores.append(s)
    return labels, scores


@pytest.mark.parametrize("ties", [True, False])
def test_auc_equals_sklearn(ties):
    rng = np.random.default_rng(7 + ties)
    labels, scores = _random_impressions(rng, 200, ties)
    sizes = np.array([len(y) for y in labels])
    per = impression_metrics(np.concatenate(labels), np.concatenate(scores), sizes)
    n_checked = 0
    for i, (y, s) in enumerate(zip(labels, scores)):
        if 0 < y.sum() < len(y):
            assert per[i, 0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
            n_checked += 1
        else:
            assert math.isnan(per[i, 0])
    assert n_checked > 150
    ref = [roc_auc_score(y, s) for y, s in zip(labels, scores) if 0 < y.sum() < len(y)]
    res = compute_metrics(np.concatenate(labels), np.concatenate(scores), sizes)
    assert res["auc"] == pytest.approx(np.mean(ref), abs=1e-12)
    assert res["auc_skipped"] == 200 - len(ref)


def test_mrr_ndcg_equal_mind_reference_on_tie_free_scores():
    rng = np.random.default_rng(11)
    labels, scores = _random_impressions(rng, 200, ties=False)
    keep = [i for i, y in enumerate(labels) if y.sum() > 0]  # MIND: >= 1 click per impression
    labels = [labels[i] for i in keep]
    scores = [scores[i] for i in keep]
    res = compute_metrics_lists(labels, scores)
    per = impression_metrics(
        np.concatenate(labels), np.concatenate(scores), np.array([len(y) for y in labels])
    )
    for i, (y, s) in enumerate(zip(labels, scores)):
        np.testing.assert_allclose(
            per[i, 1:],
            [mind_mrr_score(y, s), mind_ndcg_score(y, s, 5), mind_ndcg_score(y, s, 10)],
            rtol=1e-12,
        )
    assert res["mrr"] == pytest.approx(
        np.mean([mind_mrr_score(y, s) for y, s in zip(labels, scores)])
    )
    assert res["ndcg@10"] == pytest.approx(
        np.mean([mind_ndcg_score(y, s, 10) for y, s in zip(labels, scores)])
    )
    assert res["no_click_skipped"] == 0


def test_ranked_metrics_score_the_submission_ranks_on_ties():
    """The tie rule: tied candidates are ranked in candidate order (earlier = better), then
    MIND's metrics on -rank. Hand-computed on two tied impressions."""
    labels = np.array([1, 0, 0, 0, 0, 1], dtype=float)
    scores = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    sizes = np.array([3, 3])
    per = ranked_impression_metrics(labels, scores, sizes)
    # impression 1: click at rank 1 of 3 -> AUC 1, MRR 1, nDCG 1
    assert per[0].tolist() == [1.0, 1.0, 1.0, 1.0]
    # impression 2: click at rank 3 -> AUC 0 (both pairs lost), MRR 1/3, nDCG 1/log2(4) = 1/2
    assert per[1].tolist() == [0.0, 1 / 3, 0.5, 0.5]
    # on raw scores AUC gives each tied pair 1/2: no prediction file can carry that
    assert impression_metrics(labels, scores, sizes)[:, 0].tolist() == [0.5, 0.5]
    assert ranked_metrics(labels, scores, sizes)["auc"] == 0.5
    assert ranked_metrics(labels, scores, sizes)["mrr"] == pytest.approx(2 / 3)
    # tie-free scores: identical to the raw-score metrics
    free = np.array([0.1, 0.9, 0.3, 0.2, 0.8, 0.4])
    np.testing.assert_array_equal(
        ranked_impression_metrics(labels, free, sizes), impression_metrics(labels, free, sizes)
    )
