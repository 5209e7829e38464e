"""UNBERT: user-news matching BERT, a cross-encoder (Zhang et al., IJCAI 2021).

Paper: UNBERT (Zhang et al., IJCAI 2021), §3. One BERT input per (sample, candidate)
pair (§3.2)::

    [CLS] candidate pieces [SEP] [NSEP] title_1 pieces [NSEP] title_2 pieces ... [SEP]
    |------ news sentence -----| |--------------- user sentence -------------------|

clicked titles oldest to newest (as the history is stored), each without its own [CLS]/[SEP].

- Embedding layer (eq. 1): token + segment + news-segment embeddings, WITHOUT position
  embeddings (footnote 4: "the performance will be worse when using it"). Implemented by
  zeroing the encoder's position-embedding table and freezing it (the encoder keeps its
  transformers layout, so ``save_pretrained`` and ``load_state_dict`` work unchanged); the
  word + news-segment sum is passed as ``inputs_embeds`` and BERT adds the segment embedding.
- Segment ids (token_type_ids): 0 on the news sentence ([CLS] .. first [SEP]), 1 on the user
  sentence (its [NSEP]s, pieces and the closing [SEP]). An encoder with a single token type
  (RoBERTa-style) gets 0 everywhere; the news segments still tell the titles apart.
- News-segment ids (a new learned table, ``max_len`` rows): 0 on the news sentence, i on the
  [NSEP] and pieces of the i-th KEPT clicked title (1 = the oldest kept), and the closing [SEP]
  takes the index of the last title (0 without history): a [SEP] belongs to the segment it closes.
- [NSEP] is a NEW token: id = the encoder's vocabulary size V, added by resizing the input
  embedding to V + 1; its row starts as the mean of the existing word-piece embeddings. (With
  LoRA every base weight, this row included, stays frozen.)
- Word-level matching (WLM): the transformer's output at [CLS] (``e_w``).
- News-level matching (NLM): every title's token outputs are aggregated into one vector
  (``model.unbert_aggregator``; eq. 6-9) over its span = its lead token ([CLS] for the
  candidate, [NSEP] for a clicked title) plus its word pieces (the [SEP]s belong to no span):
  ``nsep`` = the lead token's output; ``mean`` = mean over the span (eq. 7); ``attention`` =
  ``softmax_i(w_o^T tanh(W_h w_i + b_h) + b_o)`` weights over the span (eq. 8-9; read as a
  softmax, since eq. 9's plain normalisation by a sum of unconstrained scores can divide by ~0).
  The scalar bias b_o of eq. 8 is left out: it adds the same constant to every logit of a span
  and the softmax is shift-invariant, so it changes no output and its gradient is exactly 0
  (it was the one parameter that never trained).
  These title vectors go through ``model.unbert_news_layers`` (default :data:`NEWS_LAYERS`)
  fresh transformer layers (post-LN, GELU, the encoder's width/heads/FFN size, no positions)
  and the candidate's output is ``e_n`` ("we then stack the same transformer layers as WLM",
  §3.4; the paper does not give the depth).
- Click predictor (eq. 10): ``score = Linear([e_w; e_n])``, one logit per pair (the paper's
  two-way softmax is replaced by the NCE over the 1+K candidates, as in every model here).
  ``model.unbert_signals`` = ``word`` / ``news`` keeps only ``e_w`` / ``e_n`` (Table 3's
  UNBERT_word / UNBERT_news ablation): the unused module is not built, so every parameter of
  the model trains.
- Loss: ``main`` only (NCE, MTRec eq. 3); ``model.tasks`` (auxiliary tasks) is ignored.

Maximum input length: ``min(model.unbert_max_len, encoder max_position_embeddings)``. When a
pair's input is longer, the OLDEST clicked titles are dropped first, whole titles at a time,
never the candidate (a candidate that alone does not fit raises ValueError).

Cost: inputs are built with vectorised gathers/scatters (no Python loop over pairs); the
intermediate index tensors are O(P x H x L) for P = real (sample, candidate) pairs, H history
slots, L title width, and the encoder runs on P sequences of up to ``max_len`` tokens: a
cross-encoder costs one BERT pass per candidate, with the whole history, unlike the bi-encoders.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from mtrec_dist import hub
from mtrec_dist.config import ConfigError, ModelConfig
from mtrec_dist.data.batch import Batch
from mtrec_dist.models.base import NewsRecModel
from mtrec_dist.models.encoders import NewsEncoder, build_news_encoder, keep_layers
from mtrec_dist.models.heads import nce_loss
from mtrec_dist.models.outputs import TaskOutputs
from mtrec_dist.models.user import masked_softmax
from mtrec_dist.tasks import MAIN

AGGREGATORS = ("nsep", "mean", "attention")
SIGNALS = ("both", "word", "news")  # matching signals fed to the click predictor (Table 3)
NEWS_LAYERS = 2  # default transformer layers of the news-level module


class PairInputs(NamedTuple):
    input_ids: torch.Tensor  # [P, T] long
    token_type_ids: torch.Tensor  # [P, T] long: 0 news sentence, 1 user sentence
    news_segment: torch.Tensor  # [P, T] long: 0 candidate, i = i-th kept clicked title
    attention_mask: torch.Tensor  # [P, T] long
    span: torch.Tensor  # [P, T] long: title index each token is aggregated into, -1 = none
    n_titles: torch.Tensor  # [P] long: clicked titles kept after truncation


def build_pair_inputs(
    batch: Batch, pair_b: torch.Tensor, pair_c: torch.Tensor, nsep_id: int, max_len: int
) -> PairInputs:
    """UNBERT inputs of the pairs (sample ``pair_b[p]``, candidate slot ``pair_c[p]``), [P] each.

    Titles come from ``batch.tokens`` rows ``[CLS] pieces [SEP] 0 ...``. Over-long inputs drop
    the oldest clicked titles first (see the module docstring).
    """
    tokens = batch.tokens  # [U, L]
    U, L = tokens.shape
    dev = tokens.device
    lengths = batch.attention_mask.sum(1)  # [U] incl. [CLS] and [SEP]
    cu = batch.cand_idx[pair_b, pair_c]  # [P]
    cand_len = lengths[cu]  # [P]
    hu = batch.hist_idx[pair_b]  # [P, H]
    hm = batch.hist_mask[pair_b]  # [P, H]
    cost = torch.where(hm, lengths[hu] - 1, 0)  # [P, H] [NSEP] + pieces
    budget = max_len - cand_len - 1  # [P] room left for clicked titles (1 = closing [SEP])
    if bool((budget < 0).any()):
        raise ValueError(
            f"model.unbert_max_len: effective maximum {max_len} tokens cannot hold a candidate "
            f"title of {int(cand_len.max())} tokens plus the closing [SEP]"
        )
    suffix = cost.flip(1).cumsum(1).flip(1)  # [P, H] tokens of this title and all newer ones
    keep = hm & (suffix <= budget[:, None])  # [P, H] newest titles that fit
    kc = cost * keep  # [P, H]
    offset = kc.cumsum(1) - kc  # [P, H] start of each kept title inside the user sentence
    rank = keep.cumsum(1)  # [P, H] 1-based index among kept titles
    n_titles = keep.sum(1)  # [P]
    total = cand_len + kc.sum(1) + 1  # [P]
    P, T = pair_b.numel(), int(total.max())

    ids = torch.zeros(P, T, dtype=torch.long, device=dev)
    ttype = torch.zeros_like(ids)
    nseg = torch.zeros_like(ids)
    span = torch.full_like(ids, -1)
    prow = torch.arange(P, device=dev)

    # news sentence: the candidate's own row [CLS] pieces [SEP]
    k = torch.arange(L, device=dev)  # [L]
    valid = k[None, :] < cand_len[:, None]  # [P, L]
    p_idx, k_idx = valid.nonzero(as_tuple=True)
    ids[p_idx, k_idx] = tokens[cu[p_idx], k_idx]
    span[p_idx, k_idx] = torch.where(k_idx < cand_len[p_idx] - 1, 0, -1)  # its [SEP]: no span

    # user sentence: per kept title [NSEP] + pieces (its row's positions 1..n)
    valid = keep[:, :, None] & (k[None, None, :] < cost[:, :, None])  # [P, H, L]
    p_idx, h_idx, k_idx = valid.nonzero(as_tuple=True)
    src = tokens[hu[p_idx, h_idx], k_idx]
    src = torch.where(k_idx == 0, torch.full_like(src, nsep_id), src)
    dest = cand_len[p_idx] + offset[p_idx, h_idx] + k_idx
    ids[p_idx, dest] = src
    ttype[p_idx, dest] = 1
    nseg[p_idx, dest] = rank[p_idx, h_idx]
    span[p_idx, dest] = rank[p_idx, h_idx]

    # closing [SEP] (same id as the candidate's [SEP])
    last = total - 1
    ids[prow, last] = tokens[cu, cand_len - 1]
    ttype[prow, last] = 1
    nseg[prow, last] = n_titles

    attn = (torch.arange(T, device=dev)[None, :] < total[:, None]).long()  # [P, T]
    return PairInputs(ids, ttype, nseg, attn, span, n_titles)


class UNBERT(NewsRecModel):
    """UNBERT cross-encoder (paper §3); equations, input layout and readings in the module
    docstring. Inputs longer than ``min(model.unbert_max_len, max_position_embeddings)`` drop
    the oldest clicked titles first (never the candidate). Only the ``main`` task exists.
    """

    cross_encoder = True  # one BERT input per (sample, candidate) pair
    supported_tasks = (MAIN,)
    global_dedup = False  # a title is encoded together with its sample: nothing to exchange
    needs_users = False
    multi_field = False
    per_title_encoder = False  # no title is encoded alone: no per-news layer cache

    def __init__(self, cfg: ModelConfig, meta: dict, encoder: nn.Module | None = None):
        super().__init__()
        if cfg.unbert_aggregator not in AGGREGATORS:
            raise ConfigError(
                f"model.unbert_aggregator={cfg.unbert_aggregator!r}: allowed values are "
                f"{', '.join(AGGREGATORS)}"
            )
        if encoder is None:
            encoder = keep_layers(hub.load_encoder(cfg.encoder, cfg.dropout), cfg.encoder_layers)
        bcfg = encoder.config
        self.max_len = min(int(cfg.unbert_max_len), int(bcfg.max_position_embeddings))
        if self.max_len < 4:
            raise ConfigError(
                f"model.unbert_max_len={cfg.unbert_max_len}: need at least 4 tokens "
                "([CLS] [SEP] [NSEP] [SEP])"
            )
        # [NSEP] = a new token id V: one more input-embedding row, started at the vocab mean.
        V = int(encoder.get_input_embeddings().num_embeddings)
        encoder.resize_token_embeddings(V + 1, mean_resizing=False)
        emb = encoder.get_input_embeddings()
        with torch.no_grad():
            emb.weight[V] = emb.weight[:V].mean(0)
        self.nsep_id = V
        # Position embeddings off (footnote 4): zeroed and frozen.
        pos = getattr(getattr(encoder, "embeddings", None), "position_embeddings", None)
        if pos is None:
            raise ConfigError(
                f"model.encoder={cfg.encoder!r}: UNBERT needs a BERT-style encoder with "
                "embeddings.position_embeddings"
            )
        with torch.no_grad():
            pos.weight.zero_()
        pos.weight.requires_grad_(False)
        self.use_token_types = int(getattr(bcfg, "type_vocab_size", 1)) >= 2
        if cfg.unbert_signals not in SIGNALS:
            raise ConfigError(
                f"model.unbert_signals={cfg.unbert_signals!r}: allowed values are "
                f"{', '.join(SIGNALS)}"
            )
        if cfg.unbert_news_layers < 0:
            raise ConfigError(f"model.unbert_news_layers={cfg.unbert_news_layers}: must be >= 0")
        self.signals = cfg.unbert_signals
        news_level = self.signals != "word"
        self.encoder = build_news_encoder(cfg, encoder)  # LoRA when model.lora
        D = self.encoder.hidden_size
        self.aggregator = cfg.unbert_aggregator
        self.news_segment = nn.Embedding(self.max_len, D)  # E_nseg of eq. 1
        nn.init.normal_(
            self.news_segment.weight, std=float(getattr(bcfg, "initializer_range", 0.02))
        )
        if self.aggregator == "attention" and news_level:  # eq. 8 (b_o dropped: see above)
            self.token_attention = nn.Sequential(
                nn.Linear(D, cfg.query_dim), nn.Tanh(), nn.Linear(cfg.query_dim, 1, bias=False)
            )
        layer = nn.TransformerEncoderLayer(
            D,
            nhead=int(bcfg.num_attention_heads),
            dim_feedforward=int(bcfg.intermediate_size),
            dropout=float(bcfg.hidden_dropout_prob),
            activation="gelu",
            layer_norm_eps=float(bcfg.layer_norm_eps),
            batch_first=True,
        )
        depth = cfg.unbert_news_layers if news_level else 0
        self.news_layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(depth))
        width = 2 * D if self.signals == "both" else D
        # eq. 10: [e_w; e_n] (or one of them) -> logit. No bias: the NCE softmax over a
        # sample's candidates cancels a constant shared by all of them, so a bias would get an
        # exactly-zero gradient (eq. 10's two-way softmax per pair is where the paper needs one).
        self.click = nn.Linear(width, 1, bias=False)

    def pretrained_encoder(self) -> NewsEncoder:
        return self.encoder

    def shared_parameter_names(self) -> set[str]:
        """The trainable encoder parameters (UNBERT has one task, so nothing else is shared)."""
        return {
            n for n, p in self.named_parameters() if p.requires_grad and n.startswith("encoder.")
        }

    def pair_scores(self, inputs: PairInputs) -> torch.Tensor:
        """One click logit per pair: [P]."""
        bert = self.encoder.bert
        embeds = bert.get_input_embeddings()(inputs.input_ids)  # [P, T, D]
        embeds = embeds + self.news_segment(inputs.news_segment)
        ttype = inputs.token_type_ids if self.use_token_types else torch.zeros_like(inputs.span)
        hidden = bert(
            inputs_embeds=embeds, token_type_ids=ttype, attention_mask=inputs.attention_mask
        ).last_hidden_state  # [P, T, D]
        e_w = hidden[:, 0]  # [P, D] word-level matching ([CLS])
        if self.signals == "word":
            return self.click(e_w).squeeze(-1)  # [P]
        titles, title_mask = self.aggregate(hidden, inputs.span)  # [P, N, D], [P, N]
        x = titles
        for layer in self.news_layers:
            x = layer(x, src_key_padding_mask=~title_mask)
        e_n = x[:, 0]  # [P, D] news-level matching at the candidate
        if self.signals == "news":
            return self.click(e_n).squeeze(-1)
        return self.click(torch.cat([e_w, e_n], dim=-1)).squeeze(-1)  # [P]

    def aggregate(
        self, hidden: torch.Tensor, span: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Title vectors (eq. 6-9): hidden [P, T, D], span [P, T] -> ([P, N, D], mask [P, N])."""
        N = int(span.max()) + 1
        member = span[:, None, :] == torch.arange(N, device=span.device)[None, :, None]  # [P,N,T]
        title_mask = member.any(-1)  # [P, N]
        if self.aggregator == "nsep":  # eq. 6: the span's lead token ([CLS] / [NSEP])
            lead = member.to(hidden.dtype).argmax(-1)  # [P, N] first member position
            out = hidden.gather(1, lead[..., None].expand(-1, -1, hidden.shape[-1]))
        elif self.aggregator == "mean":  # eq. 7
            m = member.to(hidden.dtype)
            out = (m @ hidden) / m.sum(-1, keepdim=True).clamp_min(1.0)
        else:  # eq. 8-9 (softmax-normalised)
            f = self.token_attention(hidden).squeeze(-1)  # [P, T]
            w = masked_softmax(f[:, None, :].expand(-1, N, -1), member)  # [P, N, T]
            out = w @ hidden
        return out * title_mask[..., None].to(hidden.dtype), title_mask

    def forward(self, batch: Batch) -> TaskOutputs:
        pair_b, pair_c = batch.cand_mask.nonzero(as_tuple=True)  # [P] real pairs
        B, C = batch.cand_mask.shape
        if pair_b.numel() == 0:  # nothing real: run one dummy pair so the zero loss has a graph
            zero = torch.zeros(1, dtype=torch.long, device=batch.cand_mask.device)
            s = self.pair_scores(build_pair_inputs(batch, zero, zero, self.nsep_id, self.max_len))
            scores = torch.full((B, C), float("-inf"), device=s.device, dtype=s.dtype)
            return TaskOutputs(losses={MAIN: 0.0 * s.sum()}, scores=scores)
        inputs = build_pair_inputs(batch, pair_b, pair_c, self.nsep_id, self.max_len)
        s = self.pair_scores(inputs)  # [P]
        scores = torch.full((B, C), float("-inf"), device=s.device, dtype=s.dtype)
        scores = scores.index_put((pair_b, pair_c), s)  # [B, C]
        main = nce_loss(scores, batch.cand_mask, batch.sample_mask)
        return TaskOutputs(losses={MAIN: main}, scores=scores)
