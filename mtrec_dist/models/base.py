"""The model contract: what a news recommender is and can do (docs/design.md §3 Models contract).

Every model in ``models/registry.py MODELS`` derives from :class:`NewsRecModel` and states its
capabilities as plain class attributes, so the registry, the trainers and the evaluator read
them off the class (or the instance) instead of probing for attributes:

==================== ================================================================
``cross_encoder``    True: a news vector depends on the sample (UNBERT, NPA), so the
                     evaluator scores through ``model(batch).scores``; False: a
                     bi-encoder with ``encode_news`` and ``score_news_vectors``
``supported_tasks``  the task losses (``mtrec_dist.tasks``) ``forward`` can return;
                     ``model.tasks`` switches the optional ones off
``global_dedup``     takes a cross-rank de-duplicated batch (``data.dedup=global``)
``needs_users``      reads ``batch.user_idx`` (user-ID embeddings): the prepared folder
                     must record users
``multi_field``      fuses category and entities into the news vector (MTRec eq. 4),
                     so it reads the prepared entity vectors
``per_title_encoder`` encodes each title alone through a BERT ``NewsEncoder``, so the
                     frozen bottom layers can be cached (``model.train_layers``, §3.1)
==================== ================================================================

Methods: ``forward(batch) -> TaskOutputs`` (every model), ``shared_parameter_names()`` (what
``trainer.surgery_scope=shared`` projects), ``pretrained_encoder()`` (the BERT-family encoder
trained at ``trainer.encoder_lr`` and exported to ``export/encoder/``, or None), bi-encoders'
``encode_news`` / ``score_news_vectors``, and ``fast_scorer(vectors)``: the model's own
scorer of whole impressions from cached news vectors (MTRec's factored additive attention,
``models/factored.py``), which the evaluator prefers when it is not None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from mtrec_dist.data.batch import Batch
from mtrec_dist.models.outputs import TaskOutputs
from mtrec_dist.tasks import MAIN

if TYPE_CHECKING:  # encoders -> layer_cache -> base: a runtime import would be a cycle
    from mtrec_dist.models.encoders import NewsEncoder


class FastScorer(Protocol):
    """Scores of whole impressions from fixed news vectors, without batches."""

    def scores(
        self, hist: np.ndarray, hist_len: np.ndarray, cand: np.ndarray, sizes: np.ndarray
    ) -> np.ndarray:
        """Flat float32 scores of impressions given as flat arrays: history rows ``hist``
        (``hist_len[i]`` per impression, oldest first) and candidate rows ``cand``
        (``sizes[i]`` per impression), in impression and candidate order."""
        ...


class NewsRecModel(nn.Module):
    """Base of every registered model: capabilities as class attributes (module docstring),
    the defaults being those of a single-task bi-encoder that needs nothing extra."""

    cross_encoder: ClassVar[bool] = False
    supported_tasks: ClassVar[tuple[str, ...]] = (MAIN,)
    global_dedup: ClassVar[bool] = False
    needs_users: ClassVar[bool] = False
    multi_field: ClassVar[bool] = False
    per_title_encoder: ClassVar[bool] = False

    def forward(self, batch: Batch) -> TaskOutputs:
        """Task losses by name and click scores [B, C] (masked candidates -inf)."""
        raise NotImplementedError

    def shared_parameter_names(self) -> set[str]:
        """Parameters every task's gradient flows through (``trainer.surgery_scope=shared``)."""
        raise NotImplementedError

    def pretrained_encoder(self) -> NewsEncoder | None:
        """The pretrained BERT-family encoder (LoRA adapters included): its parameters train
        at ``trainer.encoder_lr`` and it is exported to ``export/encoder/``. None for models
        whose encoder trains from scratch (the classic word-embedding models)."""
        return None

    def encode_news(self, batch: Batch) -> torch.Tensor:
        """Bi-encoders: news vectors [U, D] of the batch's unique news (per-news fields only)."""
        raise NotImplementedError(f"{type(self).__name__} is a cross-encoder: no news vectors")

    def score_news_vectors(self, news_vecs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Bi-encoders: click scores [B, C] from news vectors [U, D]; masked candidates -inf."""
        raise NotImplementedError(f"{type(self).__name__} is a cross-encoder: no news vectors")

    def fast_scorer(self, vectors: np.ndarray) -> FastScorer | None:
        """The model's own scorer of whole impressions from every news row's vector
        ``vectors [N, D]``, equal to ``score_news_vectors`` up to float rounding; None (the
        default) makes the evaluator batch impressions through ``score_news_vectors``."""
        return None
