"""MTRec and its BERT baselines on a tiny random BERT: shapes, hand-computed losses (eq. 1-8),
gradient routing per task, de-duplicated == naive batch, LoRA freezing, AMF fusion (eq. 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtrec_dist.config import ModelConfig
from mtrec_dist.data.batch import NER_IGNORE, NewsTable, Sample, collate
from mtrec_dist.hub import load_encoder
from mtrec_dist.models.encoders import name_embeddings
from mtrec_dist.models.mtrec import MTRec, MTRecAMF
from mtrec_dist.models.registry import MODELS as REGISTERED
from mtrec_dist.models.user import GRUUserEncoder, nrms_heads

N_NEWS, L, E, N_CAT, N_ENT = 14, 9, 3, 5, 6
META = {"has_sentiment": True, "vocab": {"category": N_CAT, "subcategory": 1, "entities": N_ENT}}
ALL_TASKS = {"category": True, "ner": True, "sentiment": True}
# the registered MTRec family (MINER, UNBERT and the classic models have their own tests)
MODELS = {n: c for n, c in REGISTERED.items() if issubclass(c, MTRec)}
MULTI_TASK = {"mtrec", "mtrec_amf"}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> NewsTable:
    """A prepared news/ folder: row 0 = empty title; random titles, tags, labels."""
    d = tmp_path_factory.mktemp("prepared")
    news = d / "news"
    news.mkdir()
    rng = np.random.default_rng(0)
    tokens = np.zeros((N_NEWS, L), np.int32)
    ner = np.full((N_NEWS, L), NER_IGNORE, np.uint8)
    tokens[0, :2] = [101, 102]
    for i in range(1, N_NEWS):
        k = int(rng.integers(2, L - 1))
        tokens[i, 0], tokens[i, 1 : 1 + k], tokens[i, 1 + k] = 101, rng.integers(1000, 3000, k), 102
        ner[i, 1 : 1 + k] = rng.integers(0, 3, k)
    category = rng.integers(1, N_CAT, N_NEWS).astype(np.int16)
    category[[0, 3]] = 0  # unknown category: excluded from eq. 6
    sentiment = rng.integers(0, 3, N_NEWS).astype(np.int8)
    sentiment[[0, 5]] = -1
    entities = rng.integers(0, N_ENT, (N_NEWS, E)).astype(np.int32)
    entities[[0, 2, 7]] = 0  # news without entities
    for name, arr in [
        ("tokens", tokens),
        ("ner", ner),
        ("category", category),
        ("subcategory", np.zeros(N_NEWS, np.int16)),
        ("sentiment", sentiment),
        ("entities", entities),
    ]:
        np.save(news / f"{name}.npy", arr)
    (news / "news_ids.txt").write_text("\n".join(["<pad>"] + [f"N{i}" for i in range(1, N_NEWS)]))
    return NewsTable(d)


SAMPLES = [
    Sample(1, np.array([1, 2, 3, 2, 5]), np.array([4, 6, 7]), np.array([1, 0, 0], np.float32)),
    Sample(2, np.array([], np.int64), np.array([2, 8, 9]), np.array([1, 0, 0], np.float32)),
    Sample(
        3, np.array([5, 10, 11, 13, 1, 2]), np.array([3, 1, 12]), np.array([1, 0, 0], np.float32)
    ),
]


@pytest.fixture(scope="module")
def batch(table):
    return collate(SAMPLES, table, batch_size=4)  # one padding sample, one empty history


def make(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(name=name, encoder="tiny", tasks=dict(ALL_TASKS), **kw)
    model = MODELS[name](cfg, META, load_encoder("tiny")).double()
    return model.eval()  # no dropout: exact comparisons


def flat_occurrences(batch):
    """(sample, unique news index) for every REAL history slot: the naive batch's history."""
    return [
        (b, int(batch.hist_idx[b, h]))
        for b in range(batch.hist_idx.shape[0])
        for h in range(batch.hist_idx.shape[1])
        if batch.hist_mask[b, h]
    ]


@pytest.mark.parametrize("name", list(MODELS))
def test_shapes_losses_and_masks(name, batch):
    model = make(name)
    out = model(batch)
    B, C = batch.cand_idx.shape
    assert out.scores.shape == (B, C)
    expected = {"main", "category", "ner", "sentiment"} if name in MULTI_TASK else {"main"}
    assert set(out.losses) == expected
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.losses.values())
    assert torch.all(out.scores[3] == float("-inf"))  # padding sample: masked candidates
    assert torch.all(out.scores[1] == 0)  # empty history: zero user vector, no NaN
    assert torch.isfinite(out.scores[[0, 2]]).all()
    # forward == encode_news + score_news_vectors (the evaluator's route)
    again = model.score_news_vectors(model.encode_news(batch), batch)
    torch.testing.assert_close(again, out.scores, rtol=0, atol=1e-12)
    assert model.cross_encoder is False
    assert model.shared_parameter_names() == {
        n for n, _ in model.named_parameters() if n.startswith("encoder.")
    }


@pytest.mark.parametrize("ner_reduction", ["sum", "mean"])
def test_hand_computed_losses(batch, ner_reduction):
    """Eq. 1-3 and 5-8 (+ sentiment) recomputed slot by slot with plain tensor ops; NER per
    title as eq. 8's sum over its tagged tokens, or their mean (model.ner_reduction)."""
    model = make("mtrec", ner_reduction=ner_reduction)
    out = model(batch)
    with torch.no_grad():
        cls, hidden = model.encoder(batch.tokens, batch.attention_mask)
        att = model.user_encoder.attention
        W, bias, q = att.proj.weight, att.proj.bias, att.query
        nce, n_real = 0.0, 0
        for b in range(4):
            if not batch.sample_mask[b]:
                continue
            hist = [cls[int(batch.hist_idx[b, h])] for h in range(6) if batch.hist_mask[b, h]]
            user = torch.zeros_like(cls[0])
            if hist:  # eq. 1
                e = torch.stack([torch.exp(q @ torch.tanh(W @ r + bias)) for r in hist])
                user = sum(e[i] / e.sum() * r for i, r in enumerate(hist))
            s = torch.stack([cls[int(j)] @ user for j in batch.cand_idx[b]])  # eq. 2
            torch.testing.assert_close(out.scores[b], s, rtol=0, atol=1e-9)
            nce += -torch.log(torch.exp(s[0]) / torch.exp(s).sum())  # eq. 3
            n_real += 1
        torch.testing.assert_close(out.losses["main"], nce / n_real, rtol=0, atol=1e-6)

        def softmax_ce(logits, target):
            p = torch.exp(logits) / torch.exp(logits).sum()
            return -torch.log(p[target])

        occ = flat_occurrences(batch)
        for task, field in (("category", batch.category), ("sentiment", batch.sentiment)):
            head = model.heads[task].linear
            valid = [u for _, u in occ if (field[u] > 0 if task == "category" else field[u] >= 0)]
            ces = [softmax_ce(head.weight @ cls[u] + head.bias, int(field[u])) for u in valid]
            assert 0 < len(valid) < len(occ)  # the unknown / missing labels are excluded
            torch.testing.assert_close(out.losses[task], torch.stack(ces).mean(), rtol=0, atol=1e-6)
        tagger = model.heads["ner"].linear
        per_title = []
        for _, u in occ:  # eq. 8: sum (or mean) over tagged tokens, mean over history titles
            toks = [t for t in range(batch.ner.shape[1]) if batch.ner[u, t] != -100]
            if toks:
                total = sum(
                    softmax_ce(tagger.weight @ hidden[u, t] + tagger.bias, int(batch.ner[u, t]))
                    for t in toks
                )
                per_title.append(total if ner_reduction == "sum" else total / len(toks))
        torch.testing.assert_close(
            out.losses["ner"], torch.stack(per_title).mean(), rtol=0, atol=1e-6
        )


def _touched(model, prefix: str) -> bool:
    """Did any parameter under ``prefix`` receive a non-zero gradient?"""
    return any(
        p.grad is not None and bool(p.grad.abs().sum() > 0)
        for n, p in model.named_parameters()
        if n.startswith(prefix)
    )


def test_gradient_routing_per_task(batch):
    model = make("mtrec")
    out = model(batch)
    parts = ("encoder.", "user_encoder.", "heads.category.", "heads.ner.", "heads.sentiment.")
    expected = {
        "main": {"encoder.", "user_encoder."},
        "category": {"encoder.", "heads.category."},
        "ner": {"encoder.", "heads.ner."},
        "sentiment": {"encoder.", "heads.sentiment."},
    }
    emb = model.encoder.bert.embeddings.word_embeddings.weight
    for task, reached in expected.items():
        model.zero_grad(set_to_none=True)
        out.losses[task].backward(retain_graph=True)
        assert {p for p in parts if _touched(model, p)} == reached, task
        assert emb.grad is not None and emb.grad.abs().sum() > 0  # reaches the embeddings


@pytest.mark.parametrize("name", ["mtrec_amf", "lstur_bert"])  # AMF covers the MTRec path
def test_dedup_equals_naive_batch(name, table, batch):
    naive = collate(SAMPLES, table, batch_size=4, dedup=False)
    assert naive.num_titles > batch.num_titles
    grads, losses = [], []
    model = make(name)
    for b in (batch, naive):
        model.zero_grad(set_to_none=True)
        out = model(b)
        sum(out.losses.values()).backward()
        losses.append({k: v.detach() for k, v in out.losses.items()})
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        scores = out.scores.detach()
    for k in losses[0]:
        torch.testing.assert_close(losses[0][k], losses[1][k], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("encoder.") for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-6)
    assert scores.shape == batch.cand_idx.shape


def test_empty_micro_batch_gives_connected_zero_losses(table):
    model = make("mtrec")
    out = model(collate([], table, batch_size=2))
    for k, v in out.losses.items():
        assert float(v.detach()) == 0.0 and v.requires_grad, k
    sum(out.losses.values()).backward()  # no NaN, graph intact
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_lora_trains_only_adapters_and_heads(batch):
    model = make("mtrec", lora=True, lora_rank=2, lora_alpha=4, lora_targets=["query", "value"])
    names = {n for n, _ in model.named_parameters()}
    adapters = {n for n in names if "lora_" in n}
    assert len(adapters) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    heads = {n for n in names if not n.startswith("encoder.")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters | heads
    assert model.shared_parameter_names() == adapters
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sum(model(batch).losses.values()).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= adapters | heads
    assert any("lora_B" in n for n in changed) and "heads.category.linear.weight" in changed
    base = [n for n in names if n.startswith("encoder.") and "lora_" not in n]
    assert base and not (set(base) & changed)


def test_amf_fusion_by_hand(batch):
    """Eq. 4 with the entity field masked out for news without entities."""
    model = make("mtrec_amf")
    f = model.fusion
    with torch.no_grad():
        cls, _ = model.encoder(batch.tokens, batch.attention_mask)
        vecs = model.encode_news(batch)
        att = f.field_attention
        for u in range(batch.num_titles):
            fields = [cls[u], f.category_proj(f.category_emb.weight[batch.category[u]])]
            ents = [int(e) for e in batch.entities[u] if e > 0]
            if ents:
                mean = torch.stack([f.entity_emb.weight[e] for e in ents]).mean(0)
                fields.append(f.entity_proj(mean))
            e = torch.stack(
                [
                    torch.exp(att.query @ torch.tanh(att.proj.weight @ r + att.proj.bias))
                    for r in fields
                ]
            )
            want = sum(e[i] / e.sum() * r for i, r in enumerate(fields))
            torch.testing.assert_close(vecs[u], want, rtol=0, atol=1e-9)
    assert any(bool((batch.entities[u] == 0).all()) for u in range(batch.num_titles))


def test_amf_init_from_encoder_names():
    from mtrec_dist.hub import load_tokenizer

    names = {
        "category": ["<unk>", "sports", "news", "finance", "travel"],
        "entities": ["", "Barack Obama", "Paris", "NFL", "Apple Inc.", "Denmark"],
    }
    torch.manual_seed(0)
    cfg = ModelConfig(name="mtrec_amf", encoder="tiny", amf_dim=7)
    model = MTRecAMF(cfg, {**META, "names": names}, load_encoder("tiny"))
    tok = load_tokenizer("tiny")
    emb = model.encoder.bert.embeddings.word_embeddings.weight.detach()
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(32, 7, generator=gen) / 32**0.5
    ids = tok("Apple Inc.", add_special_tokens=False)["input_ids"]
    want = emb[ids].mean(0) @ proj
    torch.testing.assert_close(model.fusion.entity_emb.weight[4].detach(), want)
    ids = tok("travel", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(
        model.fusion.category_emb.weight[4].detach(), emb[ids].mean(0) @ proj
    )
    got = name_embeddings(names["category"][1:], model.encoder, tok, 7)
    torch.testing.assert_close(model.fusion.category_emb.weight[1:].detach(), got)


def test_gru_user_state_equals_unpadded_run():
    torch.manual_seed(0)
    enc = GRUUserEncoder(6).double()
    hist = torch.randn(3, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    user = enc(hist, mask)
    for b, n in ((0, 3), (2, 5)):
        _, h = enc.gru(hist[b : b + 1, :n])  # the real slots alone
        torch.testing.assert_close(user[b], h[0, 0], rtol=0, atol=1e-12)
    assert torch.all(user[1] == 0)


def test_nrms_heads_and_aux_tasks_ignored_by_baselines(batch):
    assert (nrms_heads(384), nrms_heads(32), nrms_heads(36), nrms_heads(7)) == (16, 16, 12, 7)
    model = make("nrms_bert")
    assert model.user_encoder.self_attention.num_heads == 16
    assert len(model.heads) == 0
    # an additive-attention baseline and MTRec share the main path exactly
    a, b = make("bert", seed=3), make("mtrec", seed=3)
    b.load_state_dict(a.state_dict(), strict=False)
    torch.testing.assert_close(a(batch).losses["main"], b(batch).losses["main"], rtol=0, atol=0)


def test_ner_reduction_by_hand():
    """model.ner_reduction on 3 titles x 3 tokens, 2 tags: per title the sum (MTRec eq. 8) or
    the mean of its tagged tokens' CE, then the occurrence-weighted mean over titles (or the
    owners' weighted sum under global de-duplication)."""
    from math import log

    from mtrec_dist.models.heads import ner_loss

    ln2, ln3 = log(2.0), log(3.0)
    logits = torch.tensor(
        [
            [[0.0, 0.0], [log(3.0), 0.0], [5.0, 1.0]],  # CE ln 2 (tag 0), ln 4 (tag 1), ignored
            [[0.0, log(2.0)], [1.0, 2.0], [3.0, 0.0]],  # CE ln 3 (tag 0), two ignored
            [[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]],  # no tagged token: excluded
        ],
        dtype=torch.float64,
    )
    tags = torch.tensor([[0, 1, -100], [0, -100, -100], [-100, -100, -100]])
    count = torch.tensor([2.0, 1.0, 5.0], dtype=torch.float64)
    owner = torch.tensor([0.25, 0.5, 0.7], dtype=torch.float64)
    per_title = {"sum": [3 * ln2, ln3], "mean": [1.5 * ln2, ln3]}  # ln 2 + ln 4 = 3 ln 2
    for red, (a, b) in per_title.items():
        got = ner_loss(logits, tags, count, reduction=red)
        torch.testing.assert_close(got, torch.tensor((2 * a + 1 * b) / 3, dtype=torch.float64))
        got = ner_loss(logits, tags, count, owner, reduction=red)
        torch.testing.assert_close(got, torch.tensor(0.25 * a + 0.5 * b, dtype=torch.float64))
    with pytest.raises(ValueError, match="model.ner_reduction='max'.*sum, mean"):
        ner_loss(logits, tags, count, reduction="max")


def test_learned_scale_multiplies_the_dot_products_and_trains(tiny_cfg):
    """model.learned_scale: scores = exp(log_scale) * r_c . r_u, the scale starts where the
    fixed one is (1, or 1/sqrt(D) with scaled_scores) and the NCE loss gives it a gradient."""
    import math

    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.data.stream import train_loader
    from mtrec_dist.models.registry import build_model

    manifest = load_manifest(tiny_cfg().prepared_dir)
    batch = next(
        iter(
            train_loader(
                tiny_cfg().prepared_dir, rank=0, world_size=1, batch_size=4, epoch=0, seed=0,
                neg_k=4, history_len=10, loader_workers=0,
            )
        )
    )  # fmt: skip
    for scaled, start in ((False, 1.0), (True, 1.0 / math.sqrt(32))):
        torch.manual_seed(0)
        fixed = build_model(tiny_cfg(f"model.scaled_scores={scaled}"), manifest).eval()
        torch.manual_seed(0)
        learned = build_model(
            tiny_cfg(f"model.scaled_scores={scaled}", "model.learned_scale=true"), manifest
        ).eval()
        learned.load_state_dict(fixed.state_dict(), strict=False)
        assert learned.score_scale == pytest.approx(start)
        with torch.no_grad():
            learned.log_scale.fill_(math.log(2.5 * start))
        ref = fixed(batch).scores
        out = learned(batch)
        real = torch.isfinite(ref)
        torch.testing.assert_close(out.scores[real], 2.5 * ref[real], rtol=1e-5, atol=1e-6)
        out.losses["main"].backward()
        assert learned.log_scale.grad is not None and learned.log_scale.grad.abs().item() > 0
