"""Classic word-embedding baselines (NRMS, NAML, LSTUR ini/con, STUR, NPA): shapes, forwards
recomputed by hand on a 2-news example (plain loops over words, heads and views), gradients
reaching every parameter, GloVe initialisation, de-duplicated batch == naive batch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mtrec_dist.config import ModelConfig
from mtrec_dist.data.batch import NewsTable, Sample, collate
from mtrec_dist.hub import load_tokenizer
from mtrec_dist.models.classic import LSTUR, NAML, NPA, NRMS, STUR
from mtrec_dist.models.registry import MODELS

N_NEWS, L = 8, 7
META = {"vocab": {"category": 4, "subcategory": 5, "users": 3}}
SMALL = dict(
    encoder="tiny",
    word_dim=6,
    cnn_filters=4,
    nrms_heads=2,
    nrms_head_dim=3,
    query_dim=5,
    classic_category_dim=3,
    npa_user_dim=3,
    lstur_mask_prob=0.0,
)
CLASSIC = {"nrms": NRMS, "naml": NAML, "lstur": LSTUR, "stur": STUR, "npa": NPA}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> NewsTable:
    d = tmp_path_factory.mktemp("prepared")
    news = d / "news"
    news.mkdir()
    rng = np.random.default_rng(1)
    tokens = np.zeros((N_NEWS, L), np.int32)
    tokens[0, :2] = [101, 102]
    for i in range(1, N_NEWS):
        k = int(rng.integers(1, L - 1))
        tokens[i, 0], tokens[i, 1 : 1 + k], tokens[i, 1 + k] = 101, rng.integers(1000, 3000, k), 102
    arrays = {
        "tokens": tokens,
        "ner": np.full((N_NEWS, L), 255, np.uint8),
        "category": rng.integers(0, 4, N_NEWS).astype(np.int16),
        "subcategory": rng.integers(0, 5, N_NEWS).astype(np.int16),
        "sentiment": np.full(N_NEWS, -1, np.int8),
        "entities": np.zeros((N_NEWS, 2), np.int32),
    }
    for name, arr in arrays.items():
        np.save(news / f"{name}.npy", arr)
    (news / "news_ids.txt").write_text("\n".join(["<pad>"] + [f"N{i}" for i in range(1, N_NEWS)]))
    return NewsTable(d)


SAMPLES = [
    Sample(1, np.array([1, 2, 3]), np.array([4, 5, 6]), np.array([1, 0, 0], np.float32), user=1),
    Sample(2, np.array([], np.int64), np.array([2, 7, 1]), np.array([1, 0, 0], np.float32), user=2),
    Sample(3, np.array([5, 6, 1, 7]), np.array([3, 2, 4]), np.array([1, 0, 0], np.float32), user=0),
]
TWO = [Sample(1, np.array([1]), np.array([2]), np.array([1.0], np.float32), user=2)]  # 2 news


def make(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(name=name, **{**SMALL, **kw})
    return CLASSIC[name](cfg, META).double().eval()


def additive(att, xs):
    """q . tanh(W x + b), softmax, weighted sum — one vector at a time."""
    logits = torch.stack([att.query @ torch.tanh(att.proj(x)) for x in xs])
    w = torch.softmax(logits, 0)
    return sum(wi * x for wi, x in zip(w, xs))


def conv_by_hand(cnn, ws):
    """Same-padded window-3 convolution + ReLU over the real words only (pads are zero)."""
    n = ws.shape[0]
    W, b = cnn.conv.weight, cnn.conv.bias  # [F, Wd, 3]
    out = []
    for i in range(n):
        acc = b.clone()
        for k in range(3):
            j = i + k - 1
            if 0 <= j < n:
                acc = acc + W[:, :, k] @ ws[j]
        out.append(torch.relu(acc))
    return out


def words_of(emb_layer, batch, u):
    ids = [int(t) for t in batch.tokens[u] if int(t) not in (0, 101, 102)]
    return emb_layer.embedding.weight[ids], ids


@pytest.mark.parametrize("name", list(CLASSIC))
def test_shapes_and_masks(table, name):
    model = make(name)
    batch = collate(SAMPLES, table, batch_size=4)
    out = model(batch)
    assert out.scores.shape == (4, 3) and set(out.losses) == {"main"}
    assert torch.isinf(out.scores[3]).all() and torch.isfinite(out.scores[:3]).all()
    assert torch.isfinite(out.losses["main"])
    assert MODELS[name] is CLASSIC[name]  # the registry serves the same class


def test_naml_attentive_view_pooling_by_hand(table):
    model = make("naml")
    batch = collate(TWO, table)
    enc = model.encoder
    got = model.encode_news(batch)  # [2, F]
    for u in range(2):
        ws, _ = words_of(enc.words, batch, u)
        c = conv_by_hand(enc.cnn, ws)
        r_t = additive(enc.word_attention, c)
        r_c = torch.relu(enc.category_dense(enc.category_emb.weight[batch.category[u]]))
        r_s = torch.relu(enc.subcategory_dense(enc.subcategory_emb.weight[batch.subcategory[u]]))
        torch.testing.assert_close(got[u], additive(enc.view_attention, [r_t, r_c, r_s]))
    user = got[batch.hist_idx[0, 0]]  # one clicked news: attention weight 1
    torch.testing.assert_close(model(batch).scores[0, 0], got[batch.cand_idx[0, 0]] @ user)


def test_npa_personalized_attention_with_fixed_user(table):
    model = make("npa")
    with torch.no_grad():
        model.user_emb.weight[2] = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    batch = collate(TWO, table)
    e_u = model.user_emb.weight[2]
    k_w = torch.tanh(model.word_key(torch.relu(model.word_query(e_u))))
    vec = {}
    for u in range(2):
        ws, _ = words_of(model.encoder["words"], batch, u)
        c = conv_by_hand(model.encoder["cnn"], ws)
        a = torch.softmax(torch.stack([ci @ k_w for ci in c]), 0)
        vec[u] = sum(ai * ci for ai, ci in zip(a, c))
    h, cand = vec[int(batch.hist_idx[0, 0])], vec[int(batch.cand_idx[0, 0])]
    user = h  # a single clicked news takes weight 1 in the news-level attention
    torch.testing.assert_close(model(batch).scores[0, 0], cand @ user)
    # another user gives another word query, hence another score
    batch.user_idx[0] = 1
    assert not torch.isclose(model(batch).scores[0, 0], cand @ user)


def test_nrms_self_attention_by_hand(table):
    model = make("nrms")
    batch = collate(TWO, table)
    enc = model.encoder
    sa, d, H = enc.self_attention, 3, 2
    got = model.encode_news(batch)
    for u in range(2):
        ws, _ = words_of(enc.words, batch, u)
        heads = []
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            q, k, v = sa.q.weight[sl] @ ws.T, sa.k.weight[sl] @ ws.T, sa.v.weight[sl] @ ws.T
            rows = []
            for i in range(ws.shape[0]):
                a = torch.softmax(
                    torch.stack([q[:, i] @ k[:, j] / math.sqrt(d) for j in range(ws.shape[0])]), 0
                )
                rows.append(sum(a[j] * v[:, j] for j in range(ws.shape[0])))
            heads.append(torch.stack(rows))
        hs = torch.cat(heads, dim=1)
        torch.testing.assert_close(got[u], additive(enc.attention, list(hs)))


def gru_by_hand(gru, xs, h):
    """torch.nn.GRU's equations (r, z, n gates), one step at a time."""
    Wi, Wh, bi, bh = gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0
    F = h.shape[0]
    for x in xs:
        gi, gh = Wi @ x + bi, Wh @ h + bh
        r = torch.sigmoid(gi[:F] + gh[:F])
        z = torch.sigmoid(gi[F : 2 * F] + gh[F : 2 * F])
        n = torch.tanh(gi[2 * F :] + r * gh[2 * F :])
        h = (1 - z) * n + z * h
    return h


@pytest.mark.parametrize("kind", ["ini", "con"])
def test_lstur_user_id_by_hand(table, kind):
    model = make("lstur", lstur_kind=kind)
    batch = collate(SAMPLES, table, batch_size=4)
    news = model.encode_news(batch)
    got = model(batch).scores
    for b, s in enumerate(SAMPLES):
        hist = [news[int(batch.hist_idx[b, j])] for j in range(len(s.hist))]
        u_l = model.user_emb.weight[s.user]
        if s.user == 0:
            assert u_l.abs().sum() == 0  # unknown user: zero long-term vector
        if kind == "ini":
            user = gru_by_hand(model.gru, hist, u_l)
        else:
            short = gru_by_hand(model.gru, hist, torch.zeros_like(u_l)) if hist else 0 * u_l
            user = model.combine(torch.cat([short, u_l]))
        want = torch.stack([news[int(batch.cand_idx[b, c])] @ user for c in range(3)])
        torch.testing.assert_close(got[b], want)


def test_stur_user_vector_by_hand(table):
    model = make("stur")
    batch = collate(SAMPLES, table, batch_size=4)
    news = model.encode_news(batch)
    got = model(batch).scores
    for b, s in enumerate(SAMPLES):
        hist = [news[int(batch.hist_idx[b, j])] for j in range(len(s.hist))]
        zero = torch.zeros(news.shape[1], dtype=news.dtype)
        user = gru_by_hand(model.gru, hist, zero) if hist else zero
        want = torch.stack([news[int(batch.cand_idx[b, c])] @ user for c in range(3)])
        torch.testing.assert_close(got[b], want)


def test_stur_is_lstur_ini_for_unknown_users(table):
    """LSTUR-ini with the long-term part zero (user 0) is STUR with the same weights."""
    stur, lstur = make("stur"), make("lstur", lstur_kind="ini")
    missing = lstur.load_state_dict(stur.state_dict(), strict=False)
    assert missing.missing_keys == ["user_emb.weight"] and missing.unexpected_keys == []
    batch = collate(SAMPLES, table, batch_size=4)
    batch.user_idx = torch.zeros_like(batch.user_idx)
    torch.testing.assert_close(lstur(batch).scores, stur(batch).scores)


def test_lstur_masks_long_term_in_training(table):
    torch.manual_seed(0)
    model = make("lstur", lstur_mask_prob=0.5).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    users = torch.tensor([1])
    outs = set()
    for _ in range(20):
        hist = torch.zeros(1, 1, 4, dtype=torch.float64)
        fake = type("B", (), {"user_idx": users[:1], "sample_mask": torch.ones(1, dtype=torch.bool),
                               "hist_mask": torch.zeros(1, 1, dtype=torch.bool)})()  # fmt: skip
        outs.add(bool(model.user_vector(hist, fake).abs().sum() == 0))
    assert outs == {True, False}  # sometimes masked (zero vector), sometimes not
    model.eval()
    assert model.user_vector(hist, fake).abs().sum() > 0  # never masked at evaluation


@pytest.mark.parametrize("name", list(CLASSIC) + ["lstur_con"])
def test_every_parameter_gets_a_gradient(table, name):
    kind = "con" if name == "lstur_con" else "ini"
    model = make(name.split("_")[0], lstur_kind=kind)
    batch = collate(SAMPLES, table, batch_size=4)
    model(batch).losses["main"].backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


@pytest.mark.parametrize("name", ["nrms", "naml", "lstur", "stur"])
def test_dedup_equals_naive_batch(table, name):
    model = make(name)
    a = model(collate(SAMPLES, table, batch_size=4)).scores
    b = model(collate(SAMPLES, table, batch_size=4, dedup=False)).scores
    torch.testing.assert_close(a, b)


def test_glove_rows_initialise_word_embedding(tmp_path):
    tok = load_tokenizer("tiny")
    vocab = tok.get_vocab()
    p = tmp_path / "glove.txt"
    p.write_text("paris 1 2 3 4 5 6\nthe 0 0 0 0 0 1\nzzzunknownzzz 9 9 9 9 9 9\n")
    meta = {**META, "word_vectors": str(p)}
    model = NRMS(ModelConfig(name="nrms", **SMALL), meta)
    W = model.encoder.words.embedding.weight
    torch.testing.assert_close(W[vocab["paris"]], torch.tensor([1.0, 2, 3, 4, 5, 6]))
    torch.testing.assert_close(W[vocab["the"]], torch.tensor([0.0, 0, 0, 0, 0, 1]))
    assert W[0].abs().sum() == 0  # padding row
    bad = tmp_path / "bad.txt"
    bad.write_text("paris 1 2 3 4 5 6\nlyon 1 2\n")
    with pytest.raises(ValueError, match=f"{bad}:2: expected 6 numbers"):
        NRMS(ModelConfig(name="nrms", **SMALL), {**META, "word_vectors": str(bad)})


def test_lstur_user_rows_train_on_prepared_data(tiny_cfg):
    """End to end on the tiny synthetic data: prepare -> stream -> LSTUR-ini. The user table is
    sized from the manifest (news.vocab.users), the batches carry the train users, and after a
    few steps every user row that occurred in a batch received a gradient (row 0, the unknown
    user, never does); the evaluator still scores the dev split."""
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.data.stream import loader_for
    from mtrec_dist.eval.evaluate import evaluate_model
    from mtrec_dist.models.registry import build_model

    cfg = tiny_cfg(
        "model.name=lstur", "model.lstur_kind=ini", "model.lstur_mask_prob=0.0",
        "model.word_dim=8", "model.cnn_filters=8", "model.query_dim=4",
    )  # fmt: skip
    manifest = load_manifest(cfg.prepared_dir)
    n_users = manifest["news"]["vocab"]["users"]
    users_json = json.loads((cfg.prepared_dir / "vocab/users.json").read_text())
    assert n_users == len(users_json) > 2 and users_json[0] == "<unk>"
    torch.manual_seed(0)
    model = build_model(cfg, manifest).train()
    assert model.user_emb.num_embeddings == n_users
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, grad_rows = set(), set()
    for step, batch in enumerate(loader_for(cfg, rank=0, world_size=1, epoch=0)):
        if step == 3:
            break
        opt.zero_grad()
        model(batch).losses["main"].backward()
        g = model.user_emb.weight.grad
        seen |= set(batch.user_idx[batch.sample_mask].tolist())
        grad_rows |= set(torch.nonzero(g.abs().sum(1)).flatten().tolist())
        opt.step()
    assert len(seen - {0}) > 1  # several distinct train users, not everyone user 0
    assert grad_rows == seen - {0}
    res = evaluate_model(model.eval(), cfg.prepared_dir, "dev", max_impressions=20)
    assert 0.0 <= res["auc"] <= 1.0


def test_stur_trains_and_evaluates_through_the_unchanged_paths(tiny_cfg):
    """STUR was added with its class, its registry line and configs/stur.yaml only: the
    reference trainer trains it (the loss falls on a repeated batch) and the evaluator's metrics
    equal scoring every dev impression alone with ``model(batch)``, ranked with the tie rule."""
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.data.stream import eval_impressions, loader_for
    from mtrec_dist.eval.evaluate import evaluate_model
    from mtrec_dist.models.registry import build_model
    from tests.oracles import compute_metrics_lists, ranks_from_scores

    cfg = tiny_cfg(
        "model.name=stur", "model.word_dim=8", "model.cnn_filters=8", "model.query_dim=4",
        "model.classic_dropout=0.0",
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, load_manifest(cfg.prepared_dir)).train()
    assert type(model) is STUR
    batch = next(iter(loader_for(cfg, rank=0, world_size=1, epoch=0)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(batch).losses["main"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        got = evaluate_model(model, cfg.prepared_dir, "dev", max_impressions=40)
        table = NewsTable(cfg.prepared_dir)
        labels, scores = [], []
        for s in list(eval_impressions(cfg.prepared_dir, "dev"))[:40]:
            sc = model(collate([s], table)).scores[0].numpy()
            labels.append(s.labels)
            scores.append(-np.asarray(ranks_from_scores(sc), dtype=float))
    want = compute_metrics_lists(labels, scores)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
