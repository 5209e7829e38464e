"""MINER: multi-interest matching over a BERT news encoder (Li et al., ACL 2022).

Paper: MINER (Li et al., ACL 2022), §3. Pieces and where they live:

- news encoder (§3.2): BERT's [CLS] output of the title, as in MTRec -> :meth:`MINER.encode_news`.
- poly attention (§3.3, eq. 1-2): K learnable context codes ``c_k`` (dimension
  ``model.query_dim``) each attend over the clicked-news vectors ``h_j``:
  ``w_kj = softmax_j(c_k^T tanh(W_h h_j))``, ``e_k = sum_j w_kj h_j`` -> :class:`PolyAttention`.
- category-aware attention weighting (§3.4, eq. 5): the logit gets ``+ lambda * cos(b_j, b_c)``
  with ``b`` FIXED category vectors and ``lambda`` a learnable scalar (initialised to 1.0 so the
  bias acts from the first step; at fine-tuning learning rates a scalar started at 0 barely moves).
  The interest vectors then depend on the candidate: ``e_k^(c)``. Switched by
  ``model.miner_category_bias``.
- click predictor (§3.3, eq. 4): ``s_k = e_k^T h_c`` aggregated by ``model.miner_aggregator``:
  ``max`` / ``mean`` over k, or ``weighted``: ``sum_k softmax_k(e_k^T gelu(W_e h_c)) s_k``
  (target-aware attention).
- losses: ``main`` = NCE (eq. 6, MTRec eq. 3) over the 1+K candidates; ``disagreement`` = eq. 3,
  ``L_D = 1/K^2 sum_i sum_j cos(e_i, e_j)`` (all K^2 pairs, the diagonal included, exactly as
  written; the diagonal only adds the constant 1/K and no gradient). Its weight beta (eq. 7,
  0.8) is applied through the gradient groups (:data:`DEFAULT_GROUPS`), not here.

Readings where the paper is silent:

- Category vectors (the paper uses fixed 300-d GloVe vectors, which this project does not ship):
  if ``meta["names"]["category"]`` lists the category names (index 0 = "<unk>"), the vector of a
  category is the mean of the encoder's input word-piece embeddings of its name's pieces, copied
  once at construction; otherwise a fixed random N(0, 1) table of dimension 300 drawn from
  ``torch.Generator().manual_seed(0)``. Either way it is a persistent buffer (saved with the
  model, never trained); row 0 (unknown category) is the zero vector, whose cosine is 0 (no bias).
- With the category bias on, the interest vectors differ per candidate; the disagreement term is
  computed on the vectors actually used for scoring, averaged over the sample's real candidates,
  then over real samples. A sample without history has zero interest vectors: all its K scores
  are 0 and its disagreement is 0 (cosines of zero vectors are taken as 0); no NaN arises.
- Efficiency: the interest vectors are never materialised. Since ``e_k = sum_j w_kj h_j``, every
  quantity needed is a linear function of dot products of history vectors:
  ``s_k = sum_j w_kj (h_j . h_c)``, ``e_k . q = sum_j w_kj (h_j . q)`` and
  ``e_i . e_k = (w G w^T)_ik`` with ``G = H H^T``. This costs O(B C K H) memory instead of
  O(B C K D), which matters at evaluation with hundreds of candidates and the bias on.

Cross-rank de-duplication (``data.dedup=global``, ``mtrec_dist.models.dedup``): a title's
vector does not depend on the sample (bi-encoder), so each rank encodes only the titles it owns
and :func:`~mtrec_dist.models.dedup.news_vectors` returns the vectors the samples index (the
identity on a per-rank batch); the category bias reads the categories of the same rows
(:func:`~mtrec_dist.models.dedup.news_ids`). Everything after that (poly attention, bias,
disagreement, aggregation) is the same code in both modes, on this rank's samples, and MINER
has no per-news loss, so the loss and its gradients equal the per-rank path's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtrec_dist.config import ConfigError, ModelConfig
from mtrec_dist.data.batch import Batch
from mtrec_dist.hub import load_tokenizer
from mtrec_dist.models.base import NewsRecModel
from mtrec_dist.models.dedup import news_ids, news_vectors
from mtrec_dist.models.encoders import NewsEncoder, build_news_encoder
from mtrec_dist.models.heads import nce_loss
from mtrec_dist.models.outputs import TaskOutputs
from mtrec_dist.models.user import masked_softmax
from mtrec_dist.tasks import DISAGREEMENT, MAIN

AGGREGATORS = ("max", "mean", "weighted")
# Registry default gradient groups for MINER: L = L_NCE + beta * L_D (eq. 7, beta = 0.8).
DEFAULT_GROUPS: dict[str, dict[str, float]] = {MAIN: {MAIN: 1.0, DISAGREEMENT: 0.8}}
RANDOM_CATEGORY_DIM = 300  # GloVe's dimension in the paper (§4.1)
_EPS = 1e-8


def category_table(cfg: ModelConfig, meta: dict, word_embeddings: torch.Tensor) -> torch.Tensor:
    """Fixed category vectors [n_categories, Dc]; row 0 (unknown) is zero. See module docstring."""
    names = (meta.get("names") or {}).get("category")
    n_cat = (meta.get("vocab") or {}).get("category")
    if names is not None:
        if n_cat is not None and len(names) != n_cat:
            raise ConfigError(
                f"manifest news.vocab.category={n_cat} but meta['names']['category'] "
                f"lists {len(names)} names"
            )
        tok = load_tokenizer(cfg.encoder)
        table = torch.zeros(len(names), word_embeddings.shape[1])
        for i, name in enumerate(names):
            if i == 0:
                continue
            ids = tok(str(name), add_special_tokens=False)["input_ids"]
            if ids:
                table[i] = word_embeddings[torch.tensor(ids)].detach().float().mean(0)
        return table
    if n_cat is None:
        raise ConfigError(
            "model.miner_category_bias=true needs the manifest's news.vocab.category "
            "(number of categories incl. <unk>); it is missing"
        )
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(int(n_cat), RANDOM_CATEGORY_DIM, generator=gen)
    table[0] = 0.0
    return table


class PolyAttention(nn.Module):
    """Poly-attention weights (eq. 1, 2, 5): W_h, the K context codes and the bias scale lambda.

    Its own module rather than direct parameters of :class:`MINER`: ZeRO-3 gathers a module's
    parameters for the backward through hooks on the module's tensor outputs, and MINER returns
    a ``TaskOutputs`` whose tensors DeepSpeed cannot see, so MINER's own parameters were freed
    after the forward and the backward read empty tensors ("The size of tensor a (0) must match
    the size of tensor b (200)"). ``cat_lambda`` has shape [1], not a 0-dim scalar: DeepSpeed
    broadcasts every parameter from rank 0 at start-up as ``p.data.view(torch.uint8)``, which a
    0-dim tensor refuses ("self.dim() cannot be 0 to view Float as Byte").
    """

    def __init__(self, D: int, Q: int, K: int, category_bias: bool):
        super().__init__()
        self.proj = nn.Linear(D, Q, bias=False)  # W_h of eq. 2: phi_k(h) = c_k^T tanh(W_h h)
        self.codes = nn.Parameter(torch.empty(K, Q))  # c_1..c_K  [K, Q]
        nn.init.xavier_uniform_(self.codes)
        if category_bias:  # eq. 5: learnable lambda, started at 1 (module docstring)
            self.cat_lambda = nn.Parameter(torch.ones(1))

    def forward(
        self, hist: torch.Tensor, hist_mask: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Weights ``w`` [B, C', K, H]; C' = C with a bias, else 1.

        hist [B, H, D], hist_mask [B, H] bool, bias [B, C, H] (cos(b_j, b_c)) or None.
        Rows of a sample without history are all zero.
        """
        phi = torch.einsum("bhq,kq->bkh", torch.tanh(self.proj(hist)), self.codes)  # [B, K, H]
        logits = phi[:, None]  # [B, 1, K, H]
        if bias is not None:
            logits = logits + self.cat_lambda * bias[:, :, None, :]  # [B, C, K, H]
        return masked_softmax(logits, hist_mask[:, None, None, :])  # [B, C', K, H]


# State-dict keys before the poly attention became its own module -> their names now.
_RENAMED = {
    "poly_proj.weight": "poly.proj.weight",
    "codes": "poly.codes",
    "cat_lambda": "poly.cat_lambda",
}


def _load_older_names(module, state_dict, prefix, *_args) -> None:
    """A MINER state dict saved with the earlier names (and a 0-dim lambda) loads as today's."""
    for old, new in _RENAMED.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    key = prefix + "poly.cat_lambda"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


class MINER(NewsRecModel):
    """MINER bi-encoder (paper §3). See the module docstring for equations and readings.

    Tasks: ``main`` (NCE) and ``disagreement`` (eq. 3). ``model.tasks.disagreement: false``
    leaves the regulariser out (ablation); the other entries of ``model.tasks`` (MTRec's
    auxiliary tasks) are ignored. The regulariser only trains when a gradient group names it
    (:data:`DEFAULT_GROUPS`).
    """

    cross_encoder = False
    supported_tasks = (MAIN, DISAGREEMENT)
    # Bi-encoder: data.dedup=global encodes each title of the global batch once (module docstring).
    global_dedup = True
    needs_users = False
    multi_field = False
    per_title_encoder = True  # one NewsEncoder pass per title: train_layers can cache (§3.1)

    def __init__(self, cfg: ModelConfig, meta: dict, encoder: nn.Module | None = None):
        super().__init__()
        if cfg.miner_aggregator not in AGGREGATORS:
            raise ConfigError(
                f"model.miner_aggregator={cfg.miner_aggregator!r}: allowed values are "
                f"{', '.join(AGGREGATORS)}"
            )
        if cfg.miner_k < 1:
            raise ConfigError(f"model.miner_k={cfg.miner_k}: must be a positive integer")
        # BERT (+ LoRA when model.lora), shared with MTRec's code path: names start "encoder.".
        self.encoder = build_news_encoder(cfg, encoder)
        D = self.encoder.hidden_size
        Q = int(cfg.query_dim)
        self.K = int(cfg.miner_k)
        self.aggregator = cfg.miner_aggregator
        self.disagreement = bool(cfg.tasks.get(DISAGREEMENT, True))
        self.category_bias = bool(cfg.miner_category_bias)
        self.poly = PolyAttention(D, Q, self.K, self.category_bias)  # eq. 1, 2, 5
        self.register_load_state_dict_pre_hook(_load_older_names)
        if self.category_bias:  # eq. 5's category vectors: fixed (a buffer, not a parameter)
            emb = self.encoder.word_embeddings.weight
            self.register_buffer("category_vectors", category_table(cfg, meta, emb))
        if self.aggregator == "weighted":
            self.target_proj = nn.Linear(D, D)  # W_e of the target-aware attention

    # ----------------------------------------------------------------- bi-encoder API

    def encode_news(self, batch: Batch) -> torch.Tensor:
        """[CLS] vector of every unique title (§3.2): [U, D]."""
        cls, _ = self.encoder(batch.tokens, batch.attention_mask, batch.news_rows)
        return cls  # [U, D]

    def score_news_vectors(self, news_vecs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Click scores [B, C] from news vectors [U, D]; masked candidates get -inf."""
        raw, _ = self._match(news_vecs, batch.category, batch)
        return raw.masked_fill(~batch.cand_mask, float("-inf"))

    def forward(self, batch: Batch) -> TaskOutputs:
        news_vecs = news_vectors(self.encode_news(batch), batch)  # the rows samples index
        # the categories of those rows; only the bias reads them (one collective less without)
        category = news_ids(batch.category, batch) if self.category_bias else batch.category
        raw, disagreement = self._match(news_vecs, category, batch)  # [B, C], [B]
        scores = raw.masked_fill(~batch.cand_mask, float("-inf"))
        real = batch.sample_mask.to(disagreement.dtype)  # [B]
        main = nce_loss(scores, batch.cand_mask, batch.sample_mask)
        # mean over real samples; 0 (still on the graph) when there is none
        losses = {MAIN: main}
        if self.disagreement:
            losses[DISAGREEMENT] = (disagreement * real).sum() / real.sum().clamp_min(1.0)
        return TaskOutputs(losses=losses, scores=scores)

    def pretrained_encoder(self) -> NewsEncoder:
        return self.encoder

    def shared_parameter_names(self) -> set[str]:
        """Parameters both tasks (main, disagreement) depend on: the encoder, the poly attention
        (W_h, codes) and, with the category bias, lambda. W_e serves the main task only."""
        shared = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n for n in shared if not n.startswith("target_proj.")}

    # ----------------------------------------------------------------- internals

    def aggregate(self, s: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        """Final score from the K matching scores ``s`` [..., K] (eq. 4 and the three variants);
        ``a`` [..., K] = ``e_k^T gelu(W_e h_c)`` (target-aware logits, ``weighted`` only)."""
        if self.aggregator == "max":
            return s.max(dim=-1).values
        if self.aggregator == "mean":
            return s.mean(dim=-1)
        return (torch.softmax(a, dim=-1) * s).sum(-1)

    def _match(
        self, news_vecs: torch.Tensor, category: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmasked scores [B, C] and the per-sample disagreement (eq. 3) [B] from the vectors
        [U, D] and categories [U] of the titles ``batch.hist_idx`` / ``cand_idx`` index."""
        hist = news_vecs[batch.hist_idx]  # [B, H, D]
        cand = news_vecs[batch.cand_idx]  # [B, C, D]
        hist_mask = batch.hist_mask
        bias = None
        if self.category_bias:
            cv = self.category_vectors.to(news_vecs.dtype)
            b_hist = F.normalize(cv[category[batch.hist_idx]], dim=-1, eps=_EPS)  # [B,H,Dc]
            b_cand = F.normalize(cv[category[batch.cand_idx]], dim=-1, eps=_EPS)  # [B,C,Dc]
            bias = torch.einsum("bcd,bhd->bch", b_cand, b_hist)  # [B, C, H] cosines
        w = self.poly(hist, hist_mask, bias)  # [B, C', K, H]
        B, C = cand.shape[:2]
        w_c = w.expand(B, C, self.K, w.shape[-1])  # [B, C, K, H]

        hc = torch.einsum("bhd,bcd->bch", hist, cand)  # [B, C, H] h_j . h_c
        s = torch.einsum("bckh,bch->bck", w_c, hc)  # [B, C, K] s_k = e_k . h_c
        a = None
        if self.aggregator == "weighted":
            q = F.gelu(self.target_proj(cand))  # [B, C, D]
            a = torch.einsum("bckh,bch->bck", w_c, torch.einsum("bhd,bcd->bch", hist, q))
        raw = self.aggregate(s, a)  # [B, C]

        # eq. 3 on e = w H: Gram(e) = w G w^T with G = H H^T.
        gram_h = torch.einsum("bhd,bgd->bhg", hist, hist)  # [B, H, H]
        gram_e = torch.einsum("bckh,bhg,bclg->bckl", w, gram_h, w)  # [B, C', K, K]
        norms = torch.diagonal(gram_e, dim1=-2, dim2=-1).clamp_min(_EPS**2).sqrt()  # [B,C',K]
        cos = gram_e / (norms[..., :, None] * norms[..., None, :])  # [B, C', K, K]
        per = cos.mean(dim=(-2, -1))  # [B, C']
        if per.shape[1] == 1:
            dis = per[:, 0]  # [B]
        else:  # mean over the sample's real candidates
            cm = batch.cand_mask.to(per.dtype)
            dis = (per * cm).sum(1) / cm.sum(1).clamp_min(1.0)  # [B]
        return raw, dis
