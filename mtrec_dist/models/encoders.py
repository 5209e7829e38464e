"""News encoders: BERT over title word pieces (MTRec §2.1) and attentive multi-field fusion (§2.2).

``NewsEncoder`` is the one place that runs BERT on a batch's unique titles; every model
(MTRec variants, MINER, UNBERT) holds one as ``self.encoder`` so that parameter names of the
shared encoder start with ``encoder.`` and LoRA is applied in one way for all of them.

LoRA (EBNeRD poster, §3): adapters are injected in place with
``peft.inject_adapter_in_model`` (no PeftModel wrapper, so parameter names stay those of the
BertModel plus ``lora_A``/``lora_B``), and every base encoder weight is frozen: only the
adapters and the task heads train.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec_dist import hub
from mtrec_dist.config import ConfigError, ModelConfig
from mtrec_dist.models import layer_cache
from mtrec_dist.models.user import AdditiveAttention


class NewsEncoder(nn.Module):
    """Wraps a transformers BERT-family model: titles -> (title vectors, token outputs).

    MTRec §2.1: "we feed the tokenized text T into the BERT model and adopt the embedding of
    [CLS] token as the news representation r" (``pooling="cls"``). A checkpoint trained as a
    sentence encoder with mean pooling (the shipped all-MiniLM-L6-v2) is read the way it was
    trained (``pooling="mean"``: mean of the real tokens' outputs): its [CLS] output carries
    little of the title, and a short run spends its steps re-learning it (README, "Learning
    quality"). The token outputs feed the NER head (eq. 7).

    ``train_layers`` (``model.train_layers``, docs/design.md §3.1): 0 trains every layer; N > 0
    freezes the embeddings and the layers below the top N, -1 the whole encoder. The frozen
    part then always runs in eval mode without gradient, and its output is read from
    ``self.cache`` (a :class:`layer_cache.PrefixCache`, attached by the trainer or evaluator)
    when the caller passes the news-table ``rows``; without a cache it is computed, with the
    same result.
    """

    def __init__(self, bert: nn.Module, pooling: str = "cls", train_layers: int = 0):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"model.pooling={pooling!r}: allowed values are cls, mean, auto")
        self.bert = bert
        self.pooling = pooling
        self.hidden_size: int = int(bert.config.hidden_size)
        # Layers below the trained top (None: nothing frozen, the papers' full fine-tuning).
        self.frozen_layers = layer_cache.frozen_layer_count(bert, train_layers)
        if self.frozen_layers is not None:
            layer_cache.freeze_prefix(bert, self.frozen_layers)
        self.cache: layer_cache.PrefixCache | None = None  # not state: rebuilt from the data

    def train(self, mode: bool = True) -> NewsEncoder:
        """The frozen part stays in eval mode (no dropout), which keeps its cache exact."""
        super().train(mode)
        if self.frozen_layers is not None:
            for m in layer_cache.prefix_modules(self.bert, self.frozen_layers):
                m.eval()
        return self

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, attention_mask: [U, L]; rows [U]: their news-table rows (read the cache) ->
        (title vectors [U, D], token states [U, L, D])."""
        k = self.frozen_layers
        if k is None:
            hidden = self.bert(input_ids=tokens, attention_mask=attention_mask).last_hidden_state
        else:
            if self.cache is not None and rows is not None:
                h = self.cache.lookup(rows, tokens.shape[1]).to(tokens.device)  # [U, L, D]
            else:
                h = layer_cache.prefix_states(self.bert, k, tokens, attention_mask)
            hidden = layer_cache.top_states(self.bert, k, h, attention_mask)  # [U, L, D]
        if self.pooling == "cls":
            return hidden[:, 0], hidden
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [U, L, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0), hidden  # [U, D]

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.get_input_embeddings()


def apply_lora(bert: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Inject LoRA adapters (rank ``cfg.lora_rank``, alpha ``cfg.lora_alpha``) into the modules
    named by ``cfg.lora_targets`` and freeze every other encoder weight (peft does the freeze)."""
    from peft import LoraConfig, inject_adapter_in_model  # lazy: peft only for model.lora

    if cfg.lora_rank <= 0:
        raise ConfigError(f"model.lora_rank={cfg.lora_rank}: must be a positive integer")
    if not cfg.lora_targets:
        raise ConfigError("model.lora_targets is empty: name modules such as query, value")
    lcfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets),
        lora_dropout=0.0,
        bias="none",
    )
    try:
        bert = inject_adapter_in_model(lcfg, bert)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in bert.named_modules() if n})
        raise ConfigError(
            f"model.lora_targets={cfg.lora_targets}: {e}; module names in this encoder: "
            f"{', '.join(n for n in names if not n.isdigit())}"
        ) from e
    for name, p in bert.named_parameters():
        p.requires_grad_("lora_" in name)
    return bert


def resolve_pooling(cfg: ModelConfig) -> str:
    """``cfg.pooling`` with ``auto`` replaced by what the checkpoint was trained with."""
    if cfg.pooling != "auto":
        return cfg.pooling
    return hub.checkpoint_pooling(cfg.encoder)


def keep_layers(bert: nn.Module, n: int) -> nn.Module:
    """Keep the first ``n`` transformer layers (``model.encoder_layers``; 0 = all): the lower
    layers of a pretrained encoder keep its word-piece and early contextual knowledge at a
    fraction of the cost, which is what a CPU run needs."""
    layers = bert.encoder.layer
    if n <= 0 or n >= len(layers):
        return bert
    bert.encoder.layer = layers[:n]
    bert.config.num_hidden_layers = n
    return bert


def build_news_encoder(cfg: ModelConfig, encoder: nn.Module | None = None) -> NewsEncoder:
    """The model's news encoder: ``encoder`` if given, else ``hub.load_encoder(cfg.encoder, cfg.dropout)``
    cut to ``cfg.encoder_layers``; LoRA applied when ``cfg.lora``."""
    if encoder is None:
        encoder = keep_layers(hub.load_encoder(cfg.encoder, cfg.dropout), cfg.encoder_layers)
    if cfg.lora:
        encoder = apply_lora(encoder, cfg)
    return NewsEncoder(encoder, resolve_pooling(cfg), cfg.train_layers)


def name_embeddings(
    names: list[str], encoder: NewsEncoder, tokenizer, out_dim: int, seed: int = 0
) -> torch.Tensor:
    """Initial AMF embeddings for ``names`` from the encoder's own word-piece embeddings.

    Each name is tokenized (no special tokens); its word-piece embeddings (hidden size H) are
    averaged, then mapped to ``out_dim`` by a FIXED random projection P [H, out_dim] drawn
    N(0, 1/H) from a generator seeded with ``seed`` (so every rank and every run agrees and
    norms are roughly preserved). Names with no word piece (empty) give a zero row.
    Returns [len(names), out_dim].
    """
    emb = encoder.word_embeddings.weight.detach()  # [V, H]
    H = emb.shape[1]
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(H, out_dim, generator=gen, dtype=torch.float32) / H**0.5  # [H, out_dim]
    ids = tokenizer(list(names), add_special_tokens=False)["input_ids"]
    out = torch.zeros(len(names), out_dim)
    for i, piece_ids in enumerate(ids):
        if piece_ids:
            mean = emb[torch.tensor(piece_ids)].float().mean(0)  # [H]
            out[i] = mean @ proj
    return out


class MultiFieldFusion(nn.Module):
    """Attentive multi-field learning, MTRec eq. 4: r~ = sum_i w_i r_i over {title, category,
    entities}, w = softmax(q_r . tanh(W_r r_i)).

    - title field r_t: the [CLS] vector;
    - category field r_c: Linear(Emb_cat(category)) with embeddings of size ``amf_dim``
      (category 0 = "<unk>" has its own learned row);
    - entity field r_e: Linear(mean of Emb_ent over the news' entities, 0 = none excluded).
      A news WITHOUT entities has its entity field masked out of the field attention (it
      attends over title and category only), rather than a learned "no entity" vector: a
      made-up vector would take attention weight while carrying no information.
    The dense layers are plain linear maps (amf_dim -> D) into the title's space.

    Pretrained entity vectors (MTRec Appendix A: "the embeddings dimension of the entities and
    categories are 100, and both are finetuned"; MIND's 100-d TransE ``entity_embedding.vec``):
    ``entity_vectors`` [n_entity, amf_dim] with NaN rows for entities that have no vector.
    The embedding table then holds row 0 = none (padding, never used), row 1 = ONE learned
    default shared by every entity without a vector, rows 2.. = the entities with a vector
    (initialised from it, fine-tuned); ``entity_row`` maps vocabulary index -> table row.
    Without vectors the table is indexed by the vocabulary directly (``entity_row`` = identity).
    """

    def __init__(
        self,
        dim: int,
        query_dim: int,
        n_category: int,
        n_entity: int,
        amf_dim: int,
        entity_vectors: torch.Tensor | None = None,
    ):
        super().__init__()
        n_entity = max(n_entity, 1)
        self.category_emb = nn.Embedding(max(n_category, 1), amf_dim)
        if entity_vectors is None:
            row = torch.arange(n_entity)
            self.entity_emb = nn.Embedding(n_entity, amf_dim, padding_idx=0)
        else:
            if tuple(entity_vectors.shape) != (n_entity, amf_dim):
                raise ConfigError(
                    f"entity vectors have shape {tuple(entity_vectors.shape)} but AMF needs "
                    f"({n_entity}, model.amf_dim={amf_dim}): set model.amf_dim to the vectors' "
                    "width (100 for MIND's TransE vectors) or re-run prepare"
                )
            has = ~torch.isnan(entity_vectors).any(1)  # [n_entity]
            has[0] = False
            row = torch.where(has, has.long().cumsum(0) + 1, torch.ones_like(has, dtype=torch.long))
            row[0] = 0
            self.entity_emb = nn.Embedding(int(has.sum()) + 2, amf_dim, padding_idx=0)
            with torch.no_grad():
                self.entity_emb.weight[2:] = entity_vectors[has].to(self.entity_emb.weight.dtype)
        self.register_buffer("entity_row", row, persistent=False)
        self.pretrained_entities = entity_vectors is not None
        self.category_proj = nn.Linear(amf_dim, dim)
        self.entity_proj = nn.Linear(amf_dim, dim)
        self.field_attention = AdditiveAttention(dim, query_dim)

    def forward(
        self, title: torch.Tensor, category: torch.Tensor, entities: torch.Tensor
    ) -> torch.Tensor:
        """title [U, D], category [U], entities [U, E] (0 = none) -> fused news vector [U, D]."""
        r_c = self.category_proj(self.category_emb(category))  # [U, D]
        ent_mask = entities > 0  # [U, E]
        n_ent = ent_mask.sum(1, keepdim=True)  # [U, 1]
        ent = self.entity_emb(self.entity_row[entities]) * ent_mask.unsqueeze(-1)  # [U, E, amf]
        ent_mean = ent.sum(1) / n_ent.clamp_min(1)  # [U, amf_dim]
        r_e = self.entity_proj(ent_mean)  # [U, D]
        fields = torch.stack([title, r_c, r_e], dim=1)  # [U, 3, D]
        ones = torch.ones_like(n_ent, dtype=torch.bool)
        mask = torch.cat([ones, ones, n_ent > 0], dim=1)  # [U, 3]
        fused, _ = self.field_attention(fields, mask)  # [U, D]
        return fused
