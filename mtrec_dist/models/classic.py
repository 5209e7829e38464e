"""The classic word-embedding news recommenders: NRMS, NAML, LSTUR (ini / con), STUR and NPA.

These are the baselines of MTRec Table 1 and of MINER's / UNBERT's Table 2 (rows "NPA", "NAML",
"LSTUR", "NRMS"); the papers took them from Microsoft Recommenders' ``newsrec`` (MINER
footnote 6), and UNBERT states "only title of news is adopted for all methods" (§4.4). So
every model here reads the title only (NAML also its category and subcategory views) and
follows newsrec's layer sizes: 300-d word embeddings (GloVe), dropout 0.2, 400 CNN filters of
window 3, 16 self-attention heads of 16, attention query size 200.

Readings where the prepared data differs from the papers' word tokenisation:

- Words are the prepared titles' WORD PIECES (the encoder's tokenizer; ``batch.tokens``), so
  one prepared folder serves BERT and classic models alike. The word embedding has one row per
  tokenizer entry; ``data.word_vectors`` (a GloVe text file) initialises the rows whose piece
  (or its lower case, or the piece without ``##``) is a GloVe word, the others start
  N(0, 0.1^2). The embeddings are fine-tuned, as in newsrec. [CLS]/[SEP] are not words: they
  are masked out of the title encoders.
- LSTUR's and NPA's user-ID embeddings read ``batch.user_idx`` (0 = unknown user, a zero
  vector: LSTUR then falls back to its short-term GRU part, NPA to a query built from the
  biases alone).

Every model returns the ``main`` NCE loss only (MTRec eq. 3, 1 click + K negatives) and
implements the model contract of :mod:`mtrec_dist.models.base`: ``forward(batch) ->
TaskOutputs``; bi-encoders (NRMS, NAML, LSTUR) also ``encode_news`` / ``score_news_vectors``
for the evaluator. NPA's news vectors depend on the user (personalised word attention), so it
is scored like a cross-encoder (``cross_encoder = True``: the evaluator calls ``forward``).
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec_dist.config import ConfigError, ModelConfig
from mtrec_dist.data.batch import Batch
from mtrec_dist.data.vectors import word_matrix
from mtrec_dist.hub import load_tokenizer
from mtrec_dist.models.base import NewsRecModel
from mtrec_dist.models.heads import nce_loss
from mtrec_dist.models.outputs import TaskOutputs
from mtrec_dist.models.user import AdditiveAttention, masked_softmax
from mtrec_dist.tasks import MAIN

LSTUR_KINDS = ("ini", "con")


class WordEmbedding(nn.Module):
    """Word-piece ids -> 300-d vectors, with the title mask that drops padding and [CLS]/[SEP]."""

    def __init__(self, cfg: ModelConfig, meta: dict):
        super().__init__()
        tok = load_tokenizer(cfg.encoder)
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        V = max(i for _, i in vocab) + 1
        self.embedding = nn.Embedding(V, cfg.word_dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.special = [i for i in (tok.cls_token_id, tok.sep_token_id) if i is not None]
        path = meta.get("word_vectors", "")
        self.glove_coverage: float | None = None
        with torch.no_grad():
            if path:
                words = [""] * V
                for w, i in vocab:
                    words[i] = w
                mat, found = word_matrix(path, words, cfg.word_dim)
                hit = torch.from_numpy(found)
                self.embedding.weight[hit] = torch.from_numpy(mat[found])
                self.glove_coverage = float(found.mean())
            self.embedding.weight[0] = 0.0

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [U, L] -> (embeddings [U, L, word_dim], word mask [U, L] bool)."""
        mask = tokens != 0
        for s in self.special:
            mask = mask & (tokens != s)
        return self.embedding(tokens), mask


class MultiHeadSelfAttention(nn.Module):
    """NRMS's multi-head self-attention (Wu et al. 2019; newsrec ``SelfAttention``): per head k,
    ``h_i^k = sum_j softmax_j(q_i^k . k_j^k / sqrt(d)) v_j^k`` with ``q, k, v`` linear maps of
    the inputs (no bias, no output projection); heads concatenated -> ``heads * head_dim``.
    Masked keys get zero weight; a query with no real key gives a zero vector."""

    def __init__(self, in_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q = nn.Linear(in_dim, heads * head_dim, bias=False)
        self.k = nn.Linear(in_dim, heads * head_dim, bias=False)
        self.v = nn.Linear(in_dim, heads * head_dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [N, T, in_dim], mask [N, T] -> [N, T, heads * head_dim]."""
        N, T, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(N, T, self.heads, self.head_dim).transpose(1, 2)  # [N, h, T, d]

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = q @ k.transpose(-1, -2) / self.head_dim**0.5  # [N, h, T, T]
        w = masked_softmax(logits, mask[:, None, None, :].expand_as(logits))
        return (w @ v).transpose(1, 2).reshape(N, T, self.heads * self.head_dim)


class CNNTitle(nn.Module):
    """Title CNN of NAML / LSTUR / NPA: word embeddings -> dropout -> Conv1d (``cnn_filters``
    filters, window ``cnn_window``, same padding) -> ReLU -> dropout: ``c_i`` per word."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.cnn_window % 2 != 1:
            raise ConfigError(f"model.cnn_window={cfg.cnn_window}: must be odd (same padding)")
        self.conv = nn.Conv1d(cfg.word_dim, cfg.cnn_filters, cfg.cnn_window, padding="same")
        self.dropout = nn.Dropout(cfg.classic_dropout)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """emb [U, L, W], mask [U, L] -> c [U, L, F] (zero at masked words before the conv)."""
        x = self.dropout(emb) * mask[..., None].to(emb.dtype)
        c = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # [U, L, F]
        return self.dropout(c)


def _gru_last(gru: nn.GRU, hist: torch.Tensor, mask: torch.Tensor, h0=None) -> torch.Tensor:
    """GRU over left-aligned clicked news; the state at the last real slot, h0 (or 0) when the
    history is empty."""
    out, _ = gru(hist, h0)  # [B, H, D]
    n = mask.sum(1)  # [B]
    last = out[torch.arange(out.shape[0], device=out.device), (n - 1).clamp_min(0)]  # [B, D]
    empty = h0[0] if h0 is not None else torch.zeros_like(last)
    return torch.where((n > 0)[:, None], last, empty)


class _BiEncoder(NewsRecModel):
    """Shared scaffolding of NRMS / NAML / LSTUR: news vectors once per unique news, a user
    vector per sample, dot-product scores, NCE."""

    cross_encoder = False
    supported_tasks = (MAIN,)
    global_dedup = False  # the title encoders are not wired to the cross-rank exchange
    needs_users = False
    multi_field = False  # NAML's category views are its own, not MTRec's fusion
    per_title_encoder = False  # trained from scratch: no frozen BERT layers to cache

    def encode_news(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def user_vector(self, hist: torch.Tensor, batch: Batch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def score_news_vectors(self, news_vecs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """news_vecs [U, D] -> scores [B, C] (masked candidates -inf)."""
        user = self.user_vector(news_vecs[batch.hist_idx], batch)  # [B, D]
        scores = torch.einsum("bcd,bd->bc", news_vecs[batch.cand_idx], user)
        return scores.masked_fill(~batch.cand_mask, float("-inf"))

    def forward(self, batch: Batch) -> TaskOutputs:
        scores = self.score_news_vectors(self.encode_news(batch), batch)
        return TaskOutputs({MAIN: nce_loss(scores, batch.cand_mask, batch.sample_mask)}, scores)

    def shared_parameter_names(self) -> set[str]:
        """One task only: the news encoder (``encoder.*``) is what a surgery would act on."""
        return {n for n, p in self.named_parameters() if n.startswith("encoder.")}


def _user_ids(batch: Batch) -> torch.Tensor:
    """[B] user indices; a batch without users -> all 0 (unknown)."""
    B = batch.sample_mask.shape[0]
    if batch.user_idx.numel() == B:
        return batch.user_idx
    return torch.zeros(B, dtype=torch.long, device=batch.sample_mask.device)


def _n_users(meta: dict) -> int:
    """User-ID rows: ``meta["vocab"]["users"]`` (incl. 0 = unknown), the manifest's
    ``news.vocab.users`` written by ``mtrec prepare`` (train users 1..n, see
    :mod:`mtrec_dist.data.prepared`)."""
    return max(int(meta.get("vocab", {}).get("users", 1)), 1)


class NRMSNewsEncoder(nn.Module):
    """NRMS news encoder: words -> dropout -> multi-head self-attention -> dropout -> additive
    attention (query 200) -> r [heads * head_dim]."""

    def __init__(self, cfg: ModelConfig, meta: dict):
        super().__init__()
        self.words = WordEmbedding(cfg, meta)
        self.self_attention = MultiHeadSelfAttention(
            cfg.word_dim, cfg.nrms_heads, cfg.nrms_head_dim
        )
        self.attention = AdditiveAttention(cfg.nrms_heads * cfg.nrms_head_dim, cfg.query_dim)
        self.dropout = nn.Dropout(cfg.classic_dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb, mask = self.words(batch.tokens)
        h = self.dropout(self.self_attention(self.dropout(emb), mask))
        return self.attention(h, mask)[0]


class NRMS(_BiEncoder):
    """NRMS (Wu et al., EMNLP 2019): self-attentive news and user encoders on GloVe words."""

    def __init__(self, cfg: ModelConfig, meta: dict, encoder: nn.Module | None = None):
        super().__init__()
        D = cfg.nrms_heads * cfg.nrms_head_dim
        self.encoder = NRMSNewsEncoder(cfg, meta)
        self.user_self_attention = MultiHeadSelfAttention(D, cfg.nrms_heads, cfg.nrms_head_dim)
        self.user_attention = AdditiveAttention(D, cfg.query_dim)
        self.dropout = nn.Dropout(cfg.classic_dropout)

    def encode_news(self, batch: Batch) -> torch.Tensor:
        return self.encoder(batch)

    def user_vector(self, hist: torch.Tensor, batch: Batch) -> torch.Tensor:
        h = self.dropout(self.user_self_attention(hist, batch.hist_mask))
        return self.user_attention(h, batch.hist_mask)[0]


class NAMLNewsEncoder(nn.Module):
    """NAML's attentive multi-view news encoder (Wu et al., IJCAI 2019), title-only data:
    views = title (CNN + additive word attention), category and subcategory (embedding ->
    Dense + ReLU to ``cnn_filters``); the news vector is the additive attention over the views
    (``a_v = q_v . tanh(U_v r_v + u_v)``, softmax over views)."""

    def __init__(self, cfg: ModelConfig, meta: dict):
        super().__init__()
        vocab = meta.get("vocab", {})
        F = cfg.cnn_filters
        self.words = WordEmbedding(cfg, meta)
        self.cnn = CNNTitle(cfg)
        self.word_attention = AdditiveAttention(F, cfg.query_dim)
        dim = cfg.classic_category_dim
        self.category_emb = nn.Embedding(max(int(vocab.get("category", 1)), 1), dim)
        self.subcategory_emb = nn.Embedding(max(int(vocab.get("subcategory", 1)), 1), dim)
        self.category_dense = nn.Linear(dim, F)
        self.subcategory_dense = nn.Linear(dim, F)
        self.view_attention = AdditiveAttention(F, cfg.query_dim)

    def views(self, batch: Batch) -> torch.Tensor:
        """[U, 3, F]: title, category, subcategory view vectors."""
        emb, mask = self.words(batch.tokens)
        r_t = self.word_attention(self.cnn(emb, mask), mask)[0]  # [U, F]
        r_c = torch.relu(self.category_dense(self.category_emb(batch.category)))
        r_s = torch.relu(self.subcategory_dense(self.subcategory_emb(batch.subcategory)))
        return torch.stack([r_t, r_c, r_s], dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.view_attention(self.views(batch))[0]


class NAML(_BiEncoder):
    """NAML: multi-view news encoder, additive-attention user encoder."""

    def __init__(self, cfg: ModelConfig, meta: dict, encoder: nn.Module | None = None):
        super().__init__()
        self.encoder = NAMLNewsEncoder(cfg, meta)
        self.user_attention = AdditiveAttention(cfg.cnn_filters, cfg.query_dim)

    def encode_news(self, batch: Batch) -> torch.Tensor:
        return self.encoder(batch)

    def user_vector(self, hist: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.user_attention(hist, batch.hist_mask)[0]


class CNNNewsEncoder(nn.Module):
    """LSTUR's title encoder (newsrec): CNN + additive word attention -> r [cnn_filters]."""

    def __init__(self, cfg: ModelConfig, meta: dict):
        super().__init__()
        self.words = WordEmbedding(cfg, meta)
        self.cnn = CNNTitle(cfg)
        self.attention = AdditiveAttention(cfg.cnn_filters, cfg.query_dim)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb, mask = self.words(batch.tokens)
        return self.attention(self.cnn(emb, mask), mask)[0]


class LSTUR(_BiEncoder):
    """LSTUR (An et al., ACL 2019): short-term interest = a GRU over the clicked news (last real
    state); long-term interest = a user-ID embedding u_l (row 0 = unknown user = zero vector).

    - ``ini`` (LSTUR-ini): u_l is the GRU's initial state; the user vector is the last state.
    - ``con`` (LSTUR-con): [short; u_l] concatenated, then a Dense layer back to the news size
      (newsrec's reading, so that scores stay dot products with the news vectors).
    In training the long-term part is masked (user -> unknown) with probability
    ``model.lstur_mask_prob``, as LSTUR does so that the model also serves new users.
    """

    needs_users = True  # the registry refuses a prepared folder without user ids

    def __init__(self, cfg: ModelConfig, meta: dict, encoder: nn.Module | None = None):
        super().__init__()
        if cfg.lstur_kind not in LSTUR_KINDS:
            raise ConfigError(f"model.lstur_kind={cfg.lstur_kind!r}: allowed values are ini, con")
        if not 0.0 <= cfg.lstur_mask_prob < 1.0:
            raise ConfigError(f"model.lstur_mask_prob={cfg.lstur_mask_prob}: expected 0 <= p < 1")
        F = cfg.cnn_filters
        self.kind, self.mask_prob = cfg.lstur_kind, cfg.lstur_mask_prob
        self.encoder = CNNNewsEncoder(cfg, meta)
        self.user_emb = nn.Embedding(_n_users(meta), F, padding_idx=0)
        self.gru = nn.GRU(F, F, batch_first=True)
        self.combine = nn.Linear(2 * F, F) if self.kind == "con" else None

    def encode_news(self, batch: Batch) -> torch.Tensor:
        return self.encoder(batch)

    def user_vector(self, hist: torch.Tensor, batch: Batch) -> torch.Tensor:
        users = _user_ids(batch)
        if self.training and self.mask_prob > 0:
            keep = torch.rand(users.shape, device=users.device) >= self.mask_prob
            users = users * keep
        long_term = self.user_emb(users)  # [B, F]
        if self.kind == "ini":
            return _gru_last(self.gru, hist, batch.hist_mask, long_term[None].contiguous())
        short = _gru_last(self.gru, hist, batch.hist_mask)
        return self.combine(torch.cat([short, long_term], dim=-1))


class STUR(_BiEncoder):
    """STUR, LSTUR's short-term-only variant (An et al., ACL 2019: the "STUR" row of its
    ablation of long- and short-term user representations): LSTUR's CNN
    title encoder and GRU over the clicked news, without the user-ID embedding. The user vector
    is the GRU's last real state (0 for an empty history), so it equals LSTUR-ini's for an
    unknown user and needs no user ids: it serves users never seen in training."""

    def __init__(self, cfg: ModelConfig, meta: dict, encoder: nn.Module | None = None):
        super().__init__()
        F = cfg.cnn_filters
        self.encoder = CNNNewsEncoder(cfg, meta)
        self.gru = nn.GRU(F, F, batch_first=True)

    def encode_news(self, batch: Batch) -> torch.Tensor:
        return self.encoder(batch)

    def user_vector(self, hist: torch.Tensor, batch: Batch) -> torch.Tensor:
        return _gru_last(self.gru, hist, batch.hist_mask)  # [B, F]


class NPA(NewsRecModel):
    """NPA (Wu et al., KDD 2019): personalised attention from a user-ID embedding e_u.

    News encoder: CNN features c_i of the title words; word query q_w = ReLU(V_w e_u + v_w)
    (size ``query_dim``); r = sum_i softmax_i(c_i . tanh(W_p q_w + b_p)) c_i. User encoder:
    q_d = ReLU(V_d e_u + v_d); u = sum_j softmax_j(r_j . tanh(W_d q_d + b_d)) r_j over the
    clicked news. Score r_c . u. A candidate's vector depends on the user, so NPA is scored
    through ``forward`` (``cross_encoder = True``).
    """

    cross_encoder = True  # personalised word attention: news vectors depend on the user
    supported_tasks = (MAIN,)
    global_dedup = False
    needs_users = True  # the registry refuses a prepared folder without user ids
    multi_field = False
    per_title_encoder = False

    def __init__(self, cfg: ModelConfig, meta: dict, encoder: nn.Module | None = None):
        super().__init__()
        F, Q = cfg.cnn_filters, cfg.query_dim
        self.encoder = nn.ModuleDict({"words": WordEmbedding(cfg, meta), "cnn": CNNTitle(cfg)})
        self.user_emb = nn.Embedding(_n_users(meta), cfg.npa_user_dim, padding_idx=0)
        self.word_query = nn.Linear(cfg.npa_user_dim, Q)  # V_w, v_w
        self.word_key = nn.Linear(Q, F)  # W_p, b_p
        self.news_query = nn.Linear(cfg.npa_user_dim, Q)  # V_d, v_d
        self.news_key = nn.Linear(Q, F)  # W_d, b_d

    def word_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per unique news: c [U, L, F] and the word mask [U, L] (user independent)."""
        emb, mask = self.encoder["words"](batch.tokens)
        return self.encoder["cnn"](emb, mask), mask

    @staticmethod
    def personal_pool(c: torch.Tensor, mask: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """c [B, S, L, F], mask [B, S, L], key [B, F] -> [B, S, F]: sum_l softmax(c_l . key) c_l."""
        w = masked_softmax(torch.einsum("bslf,bf->bsl", c, key), mask)
        return torch.einsum("bsl,bslf->bsf", w, c)

    def forward(self, batch: Batch) -> TaskOutputs:
        c, mask = self.word_features(batch)  # [U, L, F], [U, L]
        e_u = self.user_emb(_user_ids(batch))  # [B, Du]
        k_w = torch.tanh(self.word_key(torch.relu(self.word_query(e_u))))  # [B, F]
        hist = self.personal_pool(c[batch.hist_idx], mask[batch.hist_idx], k_w)  # [B, H, F]
        cand = self.personal_pool(c[batch.cand_idx], mask[batch.cand_idx], k_w)  # [B, C, F]
        k_d = torch.tanh(self.news_key(torch.relu(self.news_query(e_u))))  # [B, F]
        a = masked_softmax(torch.einsum("bhf,bf->bh", hist, k_d), batch.hist_mask)
        user = torch.einsum("bh,bhf->bf", a, hist)  # [B, F]
        scores = torch.einsum("bcf,bf->bc", cand, user).masked_fill(~batch.cand_mask, float("-inf"))
        return TaskOutputs({MAIN: nce_loss(scores, batch.cand_mask, batch.sample_mask)}, scores)

    def shared_parameter_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if n.startswith("encoder.")}
