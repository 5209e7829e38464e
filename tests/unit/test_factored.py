"""The factored MTRec scorer against MTRec's equations computed directly (float64 numpy, one
impression at a time), with ties, empty histories, repeated news and variable candidate counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from mtrec_dist.config import ModelConfig
from mtrec_dist.metrics import ranks_of
from mtrec_dist.models import factored
from mtrec_dist.models.base import NewsRecModel
from mtrec_dist.models.mtrec import MTRec, NRMSBert

N, D = 60, 32  # news rows, vector size of the tiny encoder


def _model(scaled: bool = False, learned: bool = False) -> MTRec:
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="tiny", scaled_scores=scaled, learned_scale=learned)
    model = MTRec(cfg, {"vocab": {"category": 3}})
    if learned:  # a scale the training moved away from its start
        with torch.no_grad():
            model.log_scale.fill_(np.log(0.37))
    return model


def _impressions(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(history, candidates) rows: histories 0..12 long (repeats allowed), 1..9 candidates
    (repeats allowed, so some candidates tie exactly)."""
    out = []
    for _ in range(n):
        hist = rng.integers(1, N, rng.integers(0, 13))
        cand = rng.integers(0, N, rng.integers(1, 10))
        out.append((hist, cand))
    return out


def _reference(model: MTRec, vectors: np.ndarray, hist: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """MTRec eq. 1-2 for one impression in float64: a_i = q.tanh(W r_i + b), w = softmax(a),
    u = sum_i w_i r_i (0 without history), s_j = r_j . u * scale."""
    att = model.user_encoder.attention
    W = att.proj.weight.detach().double().numpy()
    b = att.proj.bias.detach().double().numpy()
    q = att.query.detach().double().numpy()
    V = vectors.astype(np.float64)
    u = np.zeros(V.shape[1])
    if hist.size:
        a = np.tanh(V[hist] @ W.T + b) @ q
        w = np.exp(a - a.max())
        u = (w / w.sum()) @ V[hist]
    return V[cand] @ u * model.score_scale


def _flat(imps):
    return (
        np.concatenate([h for h, _ in imps]).astype(np.int64),
        np.array([h.size for h, _ in imps]),
        np.concatenate([c for _, c in imps]).astype(np.int64),
        np.array([c.size for _, c in imps]),
    )


@pytest.mark.parametrize("scaled,learned", [(False, False), (True, False), (False, True)])
def test_factored_scores_and_ranks_equal_the_equations(scaled, learned):
    rng = np.random.default_rng(0)
    model = _model(scaled, learned)
    if learned:
        assert model.score_scale == pytest.approx(0.37)
    vectors = rng.standard_normal((N, D)).astype(np.float32)
    vectors[7] = vectors[3]  # two news with one vector: their candidates tie exactly
    imps = _impressions(rng, 200)
    imps[0] = (np.zeros(0, np.int64), np.array([5, 3, 7, 3, 9]))  # empty history: all score 0
    imps[1] = (np.array([4, 4, 4]), np.array([3, 7, 1, 7, 3, 2]))  # one news clicked 3 times
    scorer = model.fast_scorer(vectors)
    assert scorer is not None
    hist, hist_len, cand, sizes = _flat(imps)
    got = scorer.scores(hist, hist_len, cand, sizes)
    ref = [_reference(model, vectors, h, c) for h, c in imps]
    scale = max(np.abs(r).max() for r in ref)
    np.testing.assert_allclose(got, np.concatenate(ref), rtol=1e-5, atol=1e-5 * scale)
    assert np.all(got[: sizes[0]] == 0.0)

    ranks = np.split(ranks_of(got, sizes), np.cumsum(sizes)[:-1])
    same_vector = [{3, 7}]
    tied = 0
    for (_, c), r, s in zip(imps, ranks, ref):
        ordinal = rankdata(-s, method="ordinal")  # reference ranks: a tie in candidate order
        for j in range(c.size):
            for k in range(j + 1, c.size):
                same = c[j] == c[k] or {int(c[j]), int(c[k])} in same_vector
                if same or not s.any():  # one vector, or no history (every score 0)
                    tied += 1
                    assert r[j] < r[k]  # tied scores: the earlier candidate ranks first
                elif abs(s[j] - s[k]) > 1e-4 * scale:  # a clear order: the same order
                    assert (r[j] < r[k]) == (ordinal[j] < ordinal[k])
        if len(set(s.round(8).tolist())) == c.size:  # no tie at all: the exact ranks
            gaps = np.diff(np.sort(s))
            if gaps.size == 0 or gaps.min() > 1e-4 * scale:
                assert r.tolist() == ordinal.tolist()
    assert tied > 20  # ties were exercised


def test_scores_do_not_depend_on_the_chunking(monkeypatch):
    rng = np.random.default_rng(1)
    model = _model()
    vectors = rng.standard_normal((N, D)).astype(np.float32)
    imps = _impressions(rng, 100)
    whole = model.fast_scorer(vectors).scores(*_flat(imps))
    monkeypatch.setattr(factored, "CHUNK", 7)  # (the per-news logits keep their fixed chunks)
    chunked = model.fast_scorer(vectors).scores(*_flat(imps))
    assert np.array_equal(whole, chunked)  # every impression is scored on its own
    alone = [model.fast_scorer(vectors).scores(*_flat([i])) for i in imps[:10]]
    assert np.array_equal(np.concatenate(alone), whole[: sum(a.size for a in alone)])


def test_other_models_keep_the_general_path():
    vectors = np.zeros((N, D), dtype=np.float32)
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="tiny")
    assert NRMSBert(cfg, {}).fast_scorer(vectors) is None  # self-attentive user

    class Rescored(MTRec):  # a subclass with its own scores is not MTRec's equations
        def score_news_vectors(self, news_vecs, batch):
            return super().score_news_vectors(news_vecs, batch) * 2

    assert Rescored(cfg, {}).fast_scorer(vectors) is None
    assert NewsRecModel().fast_scorer(vectors) is None  # the contract's default


def test_csr_index_equals_numpy_unique():
    """_csr's stable-sort unique == np.unique(keys, return_inverse=True): the same sorted
    entries, row pointers and inverse, with duplicate pairs, empty rows and no pairs at all."""
    rng = np.random.default_rng(3)
    for n_rows, n_pairs, n_cols in ((50, 400, 7), (30, 0, 5), (8, 200, 1000)):
        rows = np.sort(rng.integers(0, n_rows, n_pairs))  # grouped by row, as the scorer's
        cols = rng.integers(0, n_cols, n_pairs)
        crow, col, inv = factored._csr(n_rows, rows, cols, n_cols)
        key, inverse = np.unique(rows * n_cols + cols, return_inverse=True)
        assert col.tolist() == (key % n_cols).tolist()
        assert inv.tolist() == inverse.ravel().tolist()
        counts = np.bincount(key // n_cols, minlength=n_rows)
        assert crow.tolist() == [0, *np.cumsum(counts).tolist()]
        assert col.dtype == inv.dtype == crow.dtype == torch.int64
