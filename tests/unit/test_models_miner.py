"""MINER (paper 004, §3): scores and losses against an explicit loop implementation."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from mtrec_dist.config import ConfigError, ModelConfig
from mtrec_dist.data.batch import Sample, collate
from mtrec_dist.hub import load_encoder, load_tokenizer
from mtrec_dist.models.miner import DEFAULT_GROUPS, MINER
from tests.unit.titles import sample, title_table

# news rows: 0 = empty title; categories 0..3 (0 = unknown)
TITLES = [[], [2000, 2001], [2002], [2003, 2004, 2005], [2006], [2007, 2008], [2009]]
CATEGORY = [0, 1, 2, 1, 3, 2, 0]
news_table = partial(title_table, TITLES, CATEGORY)

TWO = [sample([1, 2, 3], [4, 5, 1]), sample([5, 3, 3, 6], [2, 6, 3])]
META = {"count": len(TITLES), "vocab": {"category": 4, "subcategory": 1, "entities": 1}}


@pytest.fixture(scope="module")
def bert():
    """Tiny BERT re-drawn with std 0.3: at init std 0.02 every [CLS] output is nearly the same
    vector, which would make the comparisons below insensitive."""
    torch.manual_seed(0)
    enc = load_encoder("tiny")
    with torch.no_grad():
        for p in enc.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return enc


# Parameter names before the poly attention became its own module (checkpoints saved then).
_OLD_NAMES = {"poly.proj.weight": "poly_proj.weight", "poly.codes": "codes"}


def make(bert, **kw) -> MINER:
    torch.manual_seed(1)
    cfg = ModelConfig(encoder="tiny", miner_k=4, query_dim=8, **kw)
    return MINER(cfg, META, encoder=bert).eval()


def cls_vectors(model: MINER, rows: list[int]) -> torch.Tensor:
    """[CLS] of each table row, run one row at a time (no batching, no de-duplication)."""
    t = news_table()
    out = []
    for r in rows:
        n = len(TITLES[r]) + 2
        ids = torch.tensor(t.tokens[r, :n], dtype=torch.long)[None]
        h = model.encoder.bert(input_ids=ids, attention_mask=torch.ones_like(ids))
        out.append(h.last_hidden_state[0, 0])
    return torch.stack(out)


def reference(model: MINER, samples: list[Sample], lam: float | None):
    """Eq. 1-5 with explicit loops: scores [B][C], NCE and disagreement (eq. 3)."""
    cv = model.category_vectors if lam is not None else None
    scores, nces, dis = [], [], []
    vecs = cls_vectors(model, list(range(len(TITLES))))  # [N, D], one row at a time
    for s in samples:
        hist = vecs[torch.as_tensor(s.hist)]  # [M, D]
        cands = vecs[torch.as_tensor(s.cand)]  # [C, D]
        row, dis_c = [], []
        for c_pos, c_row in enumerate(s.cand):
            hc = cands[c_pos]
            interests = []
            for k in range(model.K):
                logits = []
                for j, h_row in enumerate(s.hist):
                    phi = model.poly.codes[k] @ torch.tanh(
                        model.poly.proj.weight @ hist[j]
                    )  # eq. 2
                    if cv is not None:
                        b_j, b_c = cv[CATEGORY[h_row]], cv[CATEGORY[c_row]]
                        cos = F.cosine_similarity(b_j, b_c, dim=0, eps=1e-8)
                        phi = phi + lam * cos  # eq. 5
                    logits.append(phi)
                w = torch.softmax(torch.stack(logits), 0)  # eq. 1
                interests.append((w[:, None] * hist).sum(0))
            e = torch.stack(interests)  # [K, D]
            s_k = e @ hc  # eq. 4
            if model.aggregator == "max":
                row.append(s_k.max())
            elif model.aggregator == "mean":
                row.append(s_k.mean())
            else:
                q = F.gelu(model.target_proj.weight @ hc + model.target_proj.bias)
                row.append((torch.softmax(e @ q, 0) * s_k).sum())
            pair = [
                F.cosine_similarity(e[i], e[k], dim=0)
                for i in range(model.K)
                for k in range(model.K)
            ]
            dis_c.append(torch.stack(pair).sum() / model.K**2)  # eq. 3
        sc = torch.stack(row)
        scores.append(sc)
        nces.append(-(sc[0] - torch.logsumexp(sc, 0)))  # eq. 6
        dis.append(torch.stack(dis_c).mean())
    return scores, torch.stack(nces).mean(), torch.stack(dis).mean()


@pytest.mark.parametrize("agg", ["max", "mean", "weighted"])
def test_losses_match_loops(bert, agg):
    model = make(bert, miner_aggregator=agg)
    with torch.no_grad():
        model.poly.cat_lambda.fill_(0.7)
        model.poly.codes.mul_(10.0)  # peakier attention: interest vectors differ (L_D < 0.95)
    batch = collate(TWO, news_table())
    out = model(batch)
    with torch.no_grad():
        ref_scores, ref_nce, ref_dis = reference(model, TWO, lam=0.7)
    torch.testing.assert_close(out.scores, torch.stack(ref_scores), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["main"], ref_nce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["disagreement"], ref_dis, rtol=1e-5, atol=1e-6)
    assert out.losses["disagreement"].item() < 0.95
    assert set(out.losses) == {"main", "disagreement"}
    # forward == encode_news + score_news_vectors
    with torch.no_grad():
        torch.testing.assert_close(
            model.score_news_vectors(model.encode_news(batch), batch), out.scores
        )


def test_lambda_zero_is_plain_poly_attention(bert):
    biased = make(bert, miner_aggregator="weighted", miner_category_bias=True)
    plain = make(bert, miner_aggregator="weighted", miner_category_bias=False)
    state = {
        k: v
        for k, v in biased.state_dict().items()
        if k not in ("poly.cat_lambda", "category_vectors")
    }
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        biased.poly.cat_lambda.zero_()
    batch = collate(TWO, news_table())
    a, b = biased(batch), plain(batch)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.losses["main"], b.losses["main"])
    torch.testing.assert_close(a.losses["disagreement"], b.losses["disagreement"])
    with torch.no_grad():
        ref_scores, ref_nce, ref_dis = reference(plain, TWO, lam=None)
    torch.testing.assert_close(b.scores, torch.stack(ref_scores), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.losses["main"], ref_nce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.losses["disagreement"], ref_dis, rtol=1e-5, atol=1e-6)
    # the bias does change the scores when lambda != 0 (categories differ in TWO)
    with torch.no_grad():
        biased.poly.cat_lambda.fill_(2.0)
        assert not torch.allclose(biased(batch).scores, b.scores)


def test_older_state_dict_loads(bert):
    """The poly attention is its own module (ZeRO-3 frees a model's direct parameters before the
    backward) and lambda has shape [1] (DeepSpeed's start-up broadcast refuses 0-dim ones): a
    state dict saved under the former names, with a 0-dim lambda, loads with its values."""
    saved = make(bert, miner_category_bias=True)
    with torch.no_grad():
        saved.poly.codes.mul_(3.0)
        saved.poly.cat_lambda.fill_(0.25)
    old = {_OLD_NAMES.get(k, k): v for k, v in saved.state_dict().items()}
    old["cat_lambda"] = torch.tensor(0.25)  # the former 0-dim scalar
    assert {"codes", "poly_proj.weight", "cat_lambda"} <= set(old)
    model = make(bert, miner_category_bias=True)
    assert model.poly.cat_lambda.shape == (1,)
    model.load_state_dict(old, strict=True)
    assert model.poly.cat_lambda.tolist() == [0.25]
    torch.testing.assert_close(model.poly.codes, saved.poly.codes, rtol=0, atol=0)
    with torch.no_grad():
        batch = collate(TWO, news_table())
        torch.testing.assert_close(model(batch).scores, saved(batch).scores)


def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def score_interests(model: MINER, interests: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Oracle: eq. 4 + aggregation on explicit interest vectors [..., K, D] against candidates
    [..., D] -> [...] (MINER's ``_match`` computes the same without materialising them)."""
    s = torch.einsum("...kd,...d->...k", interests, cand)
    a = None
    if model.aggregator == "weighted":
        q = F.gelu(model.target_proj(cand))
        a = torch.einsum("...kd,...d->...k", interests, q)
    return model.aggregate(s, a)


def test_aggregators_on_hand_made_vectors(bert):
    D = 32
    e = torch.zeros(3, D)
    e[0, 0], e[1, 1], e[2, 0], e[2, 1] = 1.0, 2.0, -1.0, 1.0
    hc = torch.zeros(D)
    hc[0], hc[1] = 2.0, 1.0
    # s = e . hc = [2, 2, -1]
    expected = {"max": 2.0, "mean": 1.0}
    q0, q1 = _gelu(2.0), _gelu(1.0)  # W_e = I, bias 0: q = gelu(hc)
    a = [q0, 2 * q1, -q0 + q1]
    z = sum(math.exp(x) for x in a)
    expected["weighted"] = sum(math.exp(x) / z * s for x, s in zip(a, [2.0, 2.0, -1.0]))
    for agg, want in expected.items():
        model = make(bert, miner_aggregator=agg)
        if agg == "weighted":
            with torch.no_grad():
                model.target_proj.weight.copy_(torch.eye(D))
                model.target_proj.bias.zero_()
        got = score_interests(model, e[None], hc[None])
        assert got.shape == (1,)
        assert got.item() == pytest.approx(want, rel=1e-6), agg


def test_shapes_masks_and_empty_history(bert):
    model = make(bert, miner_aggregator="weighted")
    samples = [sample([1, 2], [3, 4, 5]), sample([], [6, 1]), sample([4], [2, 5, 6])]
    batch = collate(samples, news_table(), batch_size=4)
    out = model(batch)
    assert out.scores.shape == (4, 3)
    assert torch.equal(torch.isinf(out.scores), ~batch.cand_mask)
    assert torch.isfinite(out.scores[batch.cand_mask]).all()
    # no history: zero interest vectors -> every candidate scores exactly 0
    assert torch.equal(out.scores[1, :2], torch.zeros(2))
    for v in out.losses.values():
        assert v.dim() == 0 and torch.isfinite(v)
    # the no-history sample contributes 0 disagreement and log(2) NCE
    alone = model(collate([samples[1]], news_table()))
    assert alone.losses["disagreement"].item() == 0.0
    assert alone.losses["main"].item() == pytest.approx(math.log(2), rel=1e-6)
    sum(out.losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_no_real_sample_gives_connected_zero(bert):
    model = make(bert)
    batch = collate([], news_table(), batch_size=2)
    out = model(batch)
    assert out.losses["main"].item() == 0.0 and out.losses["disagreement"].item() == 0.0
    (out.losses["main"] + out.losses["disagreement"]).backward()
    assert model.poly.codes.grad is not None and torch.equal(
        model.poly.codes.grad, torch.zeros_like(model.poly.codes)
    )


def test_gradient_paths(bert):
    model = make(bert, miner_aggregator="weighted")
    model.zero_grad()
    batch = collate(TWO, news_table())
    q = model.encoder.bert.encoder.layer[0].attention.self.query.weight
    model(batch).losses["disagreement"].backward()
    # L_D depends on e = w(H) H: codes, W_h, lambda and (through H) the encoder; not on W_e
    for p in (model.poly.codes, model.poly.proj.weight, model.poly.cat_lambda, q):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.target_proj.weight.grad is None
    model.zero_grad()
    model(batch).losses["main"].backward()
    for p in (
        model.poly.codes,
        model.poly.proj.weight,
        model.poly.cat_lambda,
        q,
        model.target_proj.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    shared = model.shared_parameter_names()
    assert "poly.codes" in shared and "encoder.bert.embeddings.word_embeddings.weight" in shared
    assert not any(n.startswith("target_proj") for n in shared)


def test_dedup_equals_naive(bert):
    model = make(bert, miner_aggregator="weighted")
    table = news_table()
    results = []
    for dedup in (True, False):
        model.zero_grad()
        b = collate(TWO, table, dedup=dedup)
        out = model(b)
        (out.losses["main"] + 0.8 * out.losses["disagreement"]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    assert a.scores.shape == b.scores.shape
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    for k in ("main", "disagreement"):
        torch.testing.assert_close(a.losses[k], b.losses[k], rtol=1e-5, atol=1e-7)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


def test_category_vectors_from_names(bert):
    names = ["<unk>", "sports", "foodanddrink", "tv"]
    cfg = ModelConfig(encoder="tiny", miner_k=2, query_dim=8)
    model = MINER(cfg, {**META, "names": {"category": names}}, encoder=bert)
    tok = load_tokenizer("tiny")
    emb = bert.get_input_embeddings().weight.detach()
    assert torch.equal(model.category_vectors[0], torch.zeros(emb.shape[1]))
    for i in (1, 2, 3):
        ids = tok(names[i], add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(model.category_vectors[i], emb[ids].mean(0))
    assert "category_vectors" in model.state_dict()
    assert "category_vectors" not in dict(model.named_parameters())
    # fallback: fixed seeded random table of dimension 300, identical across builds
    a = make(bert).category_vectors
    assert a.shape == (4, 300) and torch.equal(a, make(bert).category_vectors)
    assert torch.equal(a[0], torch.zeros(300))


def test_config_errors_and_groups(bert):
    with pytest.raises(ConfigError, match="model.miner_aggregator"):
        MINER(ModelConfig(encoder="tiny", miner_aggregator="sum"), META, encoder=bert)
    with pytest.raises(ConfigError, match="news.vocab.category"):
        MINER(ModelConfig(encoder="tiny"), {"count": 3}, encoder=bert)
    off = MINER(
        ModelConfig(encoder="tiny", miner_k=2, query_dim=8, tasks={"disagreement": False}),
        META,
        encoder=bert,
    )
    assert set(off(collate(TWO, news_table())).losses) == {"main"}
    assert DEFAULT_GROUPS == {"main": {"main": 1.0, "disagreement": 0.8}}
