"""UNBERT (paper 002, §3): input layout token by token, truncation, NCE, gradients."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from mtrec_dist.config import ConfigError, ModelConfig
from mtrec_dist.data.batch import collate
from mtrec_dist.hub import load_encoder
from mtrec_dist.models.unbert import UNBERT, build_pair_inputs
from tests.unit.titles import CLS, SEP, sample, title_table

N = 30522  # [NSEP] = the tiny encoder's vocabulary size (new embedding row)
TITLES = [[], [2000, 2001], [2002], [2003, 2004, 2005], [2006], [2005, 2004, 2003]]
news_table = partial(title_table, TITLES)

# sample A: clicked 1 then 2 (2 most recent), candidates 3, 4, 1; sample B: clicked 3, cands 2, 4
TWO = [sample([1, 2], [3, 4, 1]), sample([3], [2, 4])]


def make(**kw) -> UNBERT:
    torch.manual_seed(0)
    enc = load_encoder("tiny")
    with torch.no_grad():  # std 0.3 instead of 0.02: outputs that differ visibly between inputs
        for p in enc.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return UNBERT(ModelConfig(encoder="tiny", query_dim=8, **kw), {}, encoder=enc).eval()


def pad(rows: list[list[int]], fill: int = 0) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (T - len(r)) for r in rows])


def pairs(batch):
    return batch.cand_mask.nonzero(as_tuple=True)


def test_input_layout_token_by_token():
    batch = collate(TWO, news_table())
    inp = build_pair_inputs(batch, *pairs(batch), nsep_id=N, max_len=512)
    ids = [
        [CLS, 2003, 2004, 2005, SEP, N, 2000, 2001, N, 2002, SEP],  # A x news 3
        [CLS, 2006, SEP, N, 2000, 2001, N, 2002, SEP],  # A x news 4
        [CLS, 2000, 2001, SEP, N, 2000, 2001, N, 2002, SEP],  # A x news 1
        [CLS, 2002, SEP, N, 2003, 2004, 2005, SEP],  # B x news 2
        [CLS, 2006, SEP, N, 2003, 2004, 2005, SEP],  # B x news 4
    ]
    ttype = [
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1],
    ]
    nseg = [
        [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2],
        [0, 0, 0, 1, 1, 1, 2, 2, 2],
        [0, 0, 0, 0, 1, 1, 1, 2, 2, 2],
        [0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1],
    ]
    span = [
        [0, 0, 0, 0, -1, 1, 1, 1, 2, 2, -1],
        [0, 0, -1, 1, 1, 1, 2, 2, -1],
        [0, 0, 0, -1, 1, 1, 1, 2, 2, -1],
        [0, 0, -1, 1, 1, 1, 1, -1],
        [0, 0, -1, 1, 1, 1, 1, -1],
    ]
    assert torch.equal(inp.input_ids, pad(ids))
    assert torch.equal(inp.token_type_ids, pad(ttype))
    assert torch.equal(inp.news_segment, pad(nseg))
    assert torch.equal(inp.span, pad(span, fill=-1))
    assert torch.equal(inp.attention_mask, pad([[1] * len(r) for r in ids]))
    assert inp.n_titles.tolist() == [2, 2, 2, 1, 1]


def test_truncation_drops_oldest_titles_first():
    batch = collate(TWO, news_table())
    inp = build_pair_inputs(batch, *pairs(batch), nsep_id=N, max_len=9)
    ids = [
        [CLS, 2003, 2004, 2005, SEP, N, 2002, SEP],  # title 1 (oldest) dropped, 8 <= 9
        [CLS, 2006, SEP, N, 2000, 2001, N, 2002, SEP],  # exactly 9: both kept
        [CLS, 2000, 2001, SEP, N, 2002, SEP],  # 10 > 9: oldest dropped
        [CLS, 2002, SEP, N, 2003, 2004, 2005, SEP],
        [CLS, 2006, SEP, N, 2003, 2004, 2005, SEP],
    ]
    nseg = [
        [0, 0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 2, 2, 2],
        [0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1],
    ]
    assert torch.equal(inp.input_ids, pad(ids))
    assert torch.equal(inp.news_segment, pad(nseg))
    assert inp.n_titles.tolist() == [1, 2, 1, 1, 1]
    # too small to hold candidate 3 (5 tokens) + the closing [SEP]
    with pytest.raises(ValueError, match="model.unbert_max_len"):
        build_pair_inputs(batch, *pairs(batch), nsep_id=N, max_len=5)
    # the model gives pair (A, 3) the same score as when A had only clicked title 2
    model = make(unbert_max_len=9)
    full = model(batch).scores
    only_newest = model(collate([sample([2], [3, 4, 1]), TWO[1]], news_table())).scores
    torch.testing.assert_close(full[0, 0], only_newest[0, 0])
    assert not torch.allclose(full[0, 1], only_newest[0, 1])  # (A, 4) kept both titles


def test_scores_nce_and_gradients():
    model = make(unbert_aggregator="attention")
    assert model.max_len == 512 and model.nsep_id == N
    assert model.encoder.word_embeddings.num_embeddings == N + 1
    assert make(unbert_max_len=4096).max_len == 512  # capped at max_position_embeddings
    batch = collate(TWO, news_table(), batch_size=3)  # one padding sample
    out = model(batch)
    assert set(out.losses) == {"main"}
    assert out.scores.shape == (3, 3)
    assert torch.equal(torch.isinf(out.scores), ~batch.cand_mask)
    s = out.scores.tolist()
    nll_a = -(s[0][0] - math.log(sum(math.exp(x) for x in s[0])))
    nll_b = -(s[1][0] - math.log(math.exp(s[1][0]) + math.exp(s[1][1])))
    assert out.losses["main"].item() == pytest.approx((nll_a + nll_b) / 2, rel=1e-5)
    # every pair's score comes from its own input: scoring one pair alone gives the same
    one = build_pair_inputs(batch, torch.tensor([1]), torch.tensor([1]), N, model.max_len)
    torch.testing.assert_close(model.pair_scores(one)[0], out.scores[1, 1])

    out.losses["main"].backward()
    bert = model.encoder.bert
    for p in (
        bert.encoder.layer[0].attention.self.query.weight,
        bert.get_input_embeddings().weight,
        model.news_segment.weight,
        model.news_layers[0].linear1.weight,
        model.token_attention[0].weight,
        model.click.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    pos = bert.embeddings.position_embeddings.weight
    assert pos.grad is None and not pos.requires_grad and torch.equal(pos, torch.zeros_like(pos))
    assert bert.get_input_embeddings().weight.grad[N].abs().sum() > 0  # [NSEP] row trains
    shared = model.shared_parameter_names()
    assert "encoder.bert.embeddings.word_embeddings.weight" in shared
    assert not any(n.startswith(("click", "news_layers")) for n in shared)


def test_no_position_embeddings():
    """Without positions, permuting a candidate's pieces (same segments) leaves its score."""
    model = make(unbert_aggregator="mean")
    batch = collate([sample([1, 2], [3, 5, 4])], news_table())  # row 5 = row 3 reversed
    s = model(batch).scores[0]
    torch.testing.assert_close(s[0], s[1])
    assert not torch.allclose(s[0], s[2])


@pytest.mark.parametrize("agg", ["nsep", "mean", "attention"])
def test_aggregators(agg):
    model = make(unbert_aggregator=agg)
    torch.manual_seed(3)
    hidden = torch.randn(2, 8, 32)
    span = torch.tensor([[0, 0, -1, 1, 1, 1, 2, -1], [0, 0, 0, -1, 1, 1, -1, -1]])
    out, mask = model.aggregate(hidden, span)
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    spans = {(0, 0): [0, 1], (0, 1): [3, 4, 5], (0, 2): [6], (1, 0): [0, 1, 2], (1, 1): [4, 5]}
    for (p, n), idx in spans.items():
        x = hidden[p, idx]
        if agg == "nsep":
            want = x[0]
        elif agg == "mean":
            want = x.mean(0)
        else:
            lin1, _, lin2 = model.token_attention
            f = torch.stack([lin2(torch.tanh(lin1(v)))[0] for v in x])
            want = (torch.softmax(f, 0)[:, None] * x).sum(0)
        torch.testing.assert_close(out[p, n], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1, 2], torch.zeros(32))


def test_dedup_equals_naive_and_empty_batch():
    model = make(unbert_aggregator="nsep")
    a = model(collate(TWO, news_table(), dedup=True))
    b = model(collate(TWO, news_table(), dedup=False))
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.losses["main"], b.losses["main"], rtol=1e-5, atol=1e-6)
    empty = model(collate([], news_table(), batch_size=2))
    assert empty.losses["main"].item() == 0.0 and torch.isinf(empty.scores).all()
    empty.losses["main"].backward()
    assert torch.equal(model.click.weight.grad, torch.zeros_like(model.click.weight))


def test_config_errors():
    with pytest.raises(ConfigError, match="model.unbert_aggregator"):
        make(unbert_aggregator="max")
    with pytest.raises(ConfigError, match="model.unbert_max_len"):
        make(unbert_max_len=3)


@pytest.mark.parametrize("signals", ["both", "word", "news"])
def test_every_parameter_trains_for_each_signal(signals):
    """Table 3's switches; every trainable parameter gets a gradient (eq. 8's bias b_o, which
    the softmax cancels, is no longer a parameter)."""
    model = make(unbert_aggregator="attention", unbert_signals=signals)
    assert model.click.bias is None  # NCE over candidates cancels a shared bias
    if signals != "word":
        assert model.token_attention[2].bias is None  # the span softmax cancels b_o
    batch = collate(TWO, news_table())
    model(batch).losses["main"].backward()
    dead = [
        n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0
    ]
    assert dead == []
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert ("news_layers" in names) == (signals != "word")
    assert ("token_attention" in names) == (signals != "word")


def test_signals_and_depth_by_hand():
    """word: the click layer sees [CLS] only; news: the candidate's vector after the news-level
    layers only; depth = model.unbert_news_layers (0 = the aggregated title itself)."""
    batch = collate(TWO, news_table())
    pb, pc = pairs(batch)
    for signals, depth in (("word", 2), ("news", 0), ("news", 3)):
        model = make(unbert_aggregator="mean", unbert_signals=signals, unbert_news_layers=depth)
        assert len(model.news_layers) == (0 if signals == "word" else depth)
        inp = build_pair_inputs(batch, pb, pc, N, model.max_len)
        bert = model.encoder.bert
        emb = bert.get_input_embeddings()(inp.input_ids) + model.news_segment(inp.news_segment)
        hidden = bert(
            inputs_embeds=emb, token_type_ids=inp.token_type_ids, attention_mask=inp.attention_mask
        ).last_hidden_state
        if signals == "word":
            feat = hidden[:, 0]
        else:
            cand = torch.stack(
                [hidden[p][inp.span[p] == 0].mean(0) for p in range(len(pb))]
            )  # candidate span mean (eq. 7)
            if depth == 0:
                feat = cand
            else:
                titles, mask = model.aggregate(hidden, inp.span)
                torch.testing.assert_close(titles[:, 0], cand)
                x = titles
                for layer in model.news_layers:
                    x = layer(x, src_key_padding_mask=~mask)
                feat = x[:, 0]
        want = feat @ model.click.weight[0]
        torch.testing.assert_close(model.pair_scores(inp), want)
    with pytest.raises(ConfigError, match="model.unbert_signals"):
        make(unbert_signals="cls")
