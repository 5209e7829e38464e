"""MTRec and its BERT baselines (MTRec, Findings of ACL 2022).

One class, configured by four class attributes; the variants of Table 1 are subclasses that
only set them:

=============  ===========  ==========  ===============================================
name           multi_task   AMF (eq.4)  user encoder
=============  ===========  ==========  ===============================================
mtrec          yes          no          additive attention (eq. 1)
mtrec_amf      yes          yes         additive attention
bert           no           no          additive attention
bert_amf       no           yes         additive attention
nrms_bert      no           no          multi-head self-attention + additive attention
lstur_bert     no           no          GRU, last real state (no user-ID embedding)
=============  ===========  ==========  ===============================================

"multi_task = no" means the single-task baselines of Table 1: ``cfg.model.tasks`` is IGNORED
(only the ``main`` loss is returned, whatever the config enables), so a baseline run differs
from an MTRec run by ``model.name`` alone. Multi-task models compute the auxiliary tasks
switched on in ``cfg.model.tasks`` (sentiment only where ``meta["has_sentiment"]``).

Pipeline (MTRec §2.1): BERT encodes each unique title of the batch once; the [CLS] vector (or its
AMF fusion with category and entities) is the news vector r; the user vector r_u pools the
clicked news (eq. 1); scores s_j = r_cj . r_u (eq. 2); main loss NCE (eq. 3). Auxiliary
losses (eq. 5-8) are returned per task; combining them (eq. 9 / 11: groups, lambda = 0.3) is
the trainer's job through ``mtrec_dist.models.outputs.group_losses``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from mtrec_dist.config import ConfigError, ModelConfig
from mtrec_dist.data.batch import Batch
from mtrec_dist.hub import load_tokenizer
from mtrec_dist.models.base import NewsRecModel
from mtrec_dist.models.dedup import news_loss_weights, news_vectors
from mtrec_dist.models.encoders import (
    MultiFieldFusion,
    NewsEncoder,
    build_news_encoder,
    name_embeddings,
)
from mtrec_dist.models.factored import AttentionDotScorer
from mtrec_dist.models.heads import (
    SENTIMENT_CLASSES,
    NewsClassifier,
    TokenTagger,
    nce_loss,
    ner_per_title,
    news_class_ce,
)
from mtrec_dist.models.outputs import TaskOutputs
from mtrec_dist.models.user import AttentionUserEncoder, build_user_encoder
from mtrec_dist.tasks import CATEGORY, MAIN, NER, NEWS_COLUMN, NEWS_TASKS, SENTIMENT


def enabled_aux_tasks(cfg: ModelConfig, meta: dict) -> list[str]:
    """Auxiliary tasks switched on in ``cfg.tasks`` that the data can feed (sentiment needs
    ``meta["has_sentiment"]``; the registry turns that case into a ConfigError first)."""
    tasks = [t for t in NEWS_TASKS if cfg.tasks.get(t, False)]
    if not meta.get("has_sentiment", False) and SENTIMENT in tasks:
        tasks.remove(SENTIMENT)
    return tasks


class MTRec(NewsRecModel):
    """Bi-encoder news recommender with optional multi-task heads and multi-field fusion."""

    cross_encoder = False
    supported_tasks = (MAIN, *NEWS_TASKS)
    # Bi-encoder: title vectors do not depend on the sample, so data.dedup=global can encode
    # each title of the global batch once and exchange the vectors across ranks.
    global_dedup = True
    needs_users = False
    multi_field = False  # True: attentive multi-field fusion (eq. 4)
    per_title_encoder = True  # one NewsEncoder pass per title: train_layers can cache (§3.1)
    multi_task = True  # False: single-task baseline, cfg.model.tasks ignored
    user_kind = "attention"  # attention | nrms | gru (mtrec_dist.models.user)

    def __init__(self, cfg: ModelConfig, meta: dict, encoder: nn.Module | None = None):
        super().__init__()
        self.encoder = build_news_encoder(cfg, encoder)
        D = self.encoder.hidden_size
        vocab = meta.get("vocab", {})
        n_category = int(vocab.get("category", 1))
        self.tasks = enabled_aux_tasks(cfg, meta) if self.multi_task else []
        self.user_encoder = build_user_encoder(self.user_kind, D, cfg.query_dim)
        # Scores r_c . r_u times a scale: fixed (1, or 1/sqrt(D) with model.scaled_scores) or,
        # with model.learned_scale, a learned log-scale starting there ([1]: DeepSpeed's start-up
        # broadcast refuses 0-dim parameters). Ranks never depend on it; the NCE loss does.
        init = 1.0 / D**0.5 if cfg.scaled_scores else 1.0
        self.log_scale = (
            nn.Parameter(torch.full((1,), math.log(init))) if cfg.learned_scale else None
        )
        self._fixed_scale = init
        self.ner_reduction = cfg.ner_reduction  # sum (eq. 8) | mean over a title's tokens
        self.fusion: MultiFieldFusion | None = None
        if self.multi_field:
            ev = meta.get(
                "entity_vector_matrix"
            )  # [n_entity, d], NaN = none (vocab/entity_vectors.npy)
            self.fusion = MultiFieldFusion(
                D,
                cfg.query_dim,
                n_category,
                int(vocab.get("entities", 1)),
                cfg.amf_dim,
                None if ev is None else torch.as_tensor(ev, dtype=torch.float32),
            )
            names = meta.get("names")
            if cfg.amf_init_from_encoder and names:
                self._init_amf_from_encoder(cfg, names)
        self.heads = nn.ModuleDict()
        if CATEGORY in self.tasks:
            self.heads[CATEGORY] = NewsClassifier(D, n_category)
        if NER in self.tasks:
            self.heads[NER] = TokenTagger(D)
        if SENTIMENT in self.tasks:
            self.heads[SENTIMENT] = NewsClassifier(D, SENTIMENT_CLASSES)

    # ------------------------------------------------------------------ AMF initialisation

    @torch.no_grad()
    def _init_amf_from_encoder(self, cfg: ModelConfig, names: dict) -> None:
        """Rows 1.. of the category / entity embeddings start from the encoder's word-piece
        embeddings of the category name / entity surface form (see ``name_embeddings``: mean
        word piece, fixed seeded random projection to amf_dim). Row 0 (unknown / none) keeps
        its random init."""
        assert self.fusion is not None
        tok = load_tokenizer(cfg.encoder)
        fields = [("category", self.fusion.category_emb)]
        if not self.fusion.pretrained_entities:  # pretrained TransE vectors win
            fields.append(("entities", self.fusion.entity_emb))
        for field, emb in fields:
            vals = names.get(field)
            if not vals:
                continue
            if len(vals) != emb.num_embeddings:
                raise ConfigError(
                    f"meta names[{field!r}] has {len(vals)} entries but the vocabulary has "
                    f"{emb.num_embeddings} (manifest news.vocab.{field}); re-run prepare"
                )
            init = name_embeddings(list(vals[1:]), self.encoder, tok, emb.embedding_dim)
            emb.weight[1:] = init.to(emb.weight.dtype)

    # ------------------------------------------------------------------ bi-encoder API

    def _encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (news vectors [U, D], [CLS] [U, D], token outputs [U, L, D])."""
        cls, hidden = self.encoder(batch.tokens, batch.attention_mask, batch.news_rows)
        vecs = cls
        if self.fusion is not None:
            vecs = self.fusion(cls, batch.category, batch.entities)  # [U, D]
        return vecs, cls, hidden

    def encode_news(self, batch: Batch) -> torch.Tensor:
        """News vectors [U, D] of the batch's unique news (per-news fields only)."""
        return self._encode(batch)[0]

    @property
    def score_scale(self) -> float:
        """The current multiplier of the dot products (read by :meth:`fast_scorer`)."""
        if self.log_scale is None:
            return self._fixed_scale
        return float(self.log_scale.detach().exp())

    def score_news_vectors(self, news_vecs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """news_vecs [U, D] -> click scores [B, C] (eq. 1-2); masked candidates -inf."""
        hist = news_vecs[batch.hist_idx]  # [B, H, D]
        user = self.user_encoder(hist, batch.hist_mask)  # [B, D]
        cand = news_vecs[batch.cand_idx]  # [B, C, D]
        scale = self._fixed_scale if self.log_scale is None else self.log_scale.exp()
        scores = torch.einsum("bcd,bd->bc", cand, user) * scale  # [B, C]
        return scores.masked_fill(~batch.cand_mask, float("-inf"))

    def fast_scorer(self, vectors: np.ndarray) -> AttentionDotScorer | None:
        """MTRec's scores (eq. 1-2) factored over the news rows (``models/factored.py``): the
        attention logit of every news once, then sparse products per impression. None when a
        subclass scores otherwise or its user encoder is not exactly additive attention
        (``nrms_bert``, ``lstur_bert``): the evaluator then batches ``score_news_vectors``."""
        if type(self).score_news_vectors is not MTRec.score_news_vectors:
            return None
        if type(self.user_encoder) is not AttentionUserEncoder:
            return None
        return AttentionDotScorer(self.user_encoder.attention, self.score_scale, vectors)

    def forward(self, batch: Batch) -> TaskOutputs:
        vecs, cls, hidden = self._encode(batch)  # [U, D]: the titles this rank encodes
        scores = self.score_news_vectors(news_vectors(vecs, batch), batch)  # [B, C]
        losses = {MAIN: nce_loss(scores, batch.cand_mask, batch.sample_mask)}
        valid = batch.news_valid()  # [U, len(NEWS_TASKS)], columns NEWS_COLUMN[task]
        if CATEGORY in self.heads:  # eq. 5-6
            logits = self.heads[CATEGORY](cls)  # [U, n_category]
            ce = news_class_ce(logits, batch.category, valid[:, NEWS_COLUMN[CATEGORY]])  # [U]
            losses[CATEGORY] = news_loss_weights(batch, CATEGORY, cls.dtype).reduce(ce)
        if NER in self.heads:  # eq. 7-8
            tags = self.heads[NER](hidden)  # [U, L, 3]
            per_title = ner_per_title(tags, batch.ner, self.ner_reduction)  # [U]
            losses[NER] = news_loss_weights(batch, NER, cls.dtype).reduce(per_title)
        if SENTIMENT in self.heads:  # EBNeRD poster: sentiment classification on [CLS]
            logits = self.heads[SENTIMENT](cls)  # [U, 3]
            ce = news_class_ce(logits, batch.sentiment, valid[:, NEWS_COLUMN[SENTIMENT]])  # [U]
            losses[SENTIMENT] = news_loss_weights(batch, SENTIMENT, cls.dtype).reduce(ce)
        return TaskOutputs(losses=losses, scores=scores)

    def pretrained_encoder(self) -> NewsEncoder:
        return self.encoder

    def shared_parameter_names(self) -> set[str]:
        """Trainable encoder parameters (all of BERT, or only the LoRA adapters when the base
        is frozen): every task's gradient flows through them. Heads, the user encoder and the
        AMF fusion serve one task each."""
        return {
            n for n, p in self.named_parameters() if n.startswith("encoder.") and p.requires_grad
        }


class BERT(MTRec):
    """BERT baseline (Table 1): main task only; cfg.model.tasks is ignored."""

    multi_task = False
    supported_tasks = (MAIN,)


class MTRecAMF(MTRec):
    """MTRec+AMF (Table 1): multi-task heads on [CLS], news vector fused by eq. 4."""

    multi_field = True


class BertAMF(MTRec):
    """BERT+AMF (Table 1): single task, news vector fused by eq. 4; tasks ignored."""

    multi_task = False
    supported_tasks = (MAIN,)
    multi_field = True


class NRMSBert(MTRec):
    """NRMS+BERT (Table 1, Wu et al. 2021b): self-attentive user encoder; single task."""

    multi_task = False
    supported_tasks = (MAIN,)
    user_kind = "nrms"


class LSTURBert(MTRec):
    """LSTUR+BERT (Table 1): GRU user encoder without user-ID embedding; single task."""

    multi_task = False
    supported_tasks = (MAIN,)
    user_kind = "gru"
