"""Auxiliary task heads and their occurrence-weighted losses (MTRec §2.3, eq. 5-8).

The auxiliary tasks act on the HISTORY news. A batch encodes each distinct title once, so
every per-news loss is weighted by ``hist_count`` (its occurrences among real history slots):
the weighted mean then equals the mean over history occurrences of the non-de-duplicated
batch (docs/design.md §2.5 De-duplicated batch and occurrence weighting). A micro-batch with
nothing to learn from gives a zero loss that stays connected to the graph, so every rank runs
the same backward.

The heads compute each title's loss [U]; how it reduces to the rank's scalar is the
de-duplication room's (``mtrec_dist.models.dedup.NewsLossWeights``): the occurrence-weighted
mean on a per-rank batch, or, under cross-rank de-duplication, the owner's explicitly weighted
sum (the weights already hold every rank's normaliser). A model reads both through
``dedup.news_loss_weights(batch, task, dtype).reduce(per_news)``; :func:`news_class_loss` and
:func:`ner_loss` are the same losses from explicit counts (or owner weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtrec_dist.models.dedup import loss_weights

SENTIMENT_CLASSES = 3  # negative / neutral / positive (EBNeRD poster)
NER_CLASSES = 3  # O, B, I (mtrec_dist.data.batch.NER_TAGS)


class NewsClassifier(nn.Module):
    """p = softmax(W r + b) on the [CLS] vector r (eq. 5 for categories; sentiment likewise)."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, n_classes)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """cls [U, D] -> logits [U, K]."""
        return self.linear(cls)


class TokenTagger(nn.Module):
    """p_t = softmax(W_n r_t + b_n) on each token output r_t of BERT (eq. 7)."""

    def __init__(self, dim: int, n_tags: int = NER_CLASSES):
        super().__init__()
        self.linear = nn.Linear(dim, n_tags)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [U, L, D] -> logits [U, L, n_tags]."""
        return self.linear(hidden)


def weighted_mean(per_news: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * x) / sum(w) for occurrence COUNTS w (integers >= 0).

    Dividing by max(sum(w), 1) is exact whenever some w > 0 and gives 0 * x (a zero still on
    the graph, with no host sync) when every w is 0.
    """
    return (weights * per_news).sum() / weights.sum().clamp_min(1.0)


def news_class_ce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eq. 6 per title: the cross-entropy [U] of logits [U, K] against target [U] (any value
    where not ``valid`` [U] bool: class 0 is scored there and the weight drops it)."""
    safe = torch.where(valid, target, torch.zeros_like(target))  # [U]
    return F.cross_entropy(logits, safe, reduction="none")  # [U]


def news_class_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    hist_count: torch.Tensor,
    valid: torch.Tensor,
    owner_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 6 over history occurrences: sum_u c_u [valid_u] CE_u / sum_u c_u [valid_u].

    logits [U, K], target [U] (any value where not valid), hist_count [U], valid [U] bool;
    ``owner_weight`` [U]: the owner's weights instead (``dedup.loss_weights``).
    """
    return loss_weights(hist_count, valid, owner_weight).reduce(
        news_class_ce(logits, target, valid)
    )


NER_REDUCTIONS = ("sum", "mean")  # model.ner_reduction


def ner_per_title(
    logits: torch.Tensor, tags: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """The NER loss of each title [U] (0 for a title without a tagged token).

    ``reduction`` (``model.ner_reduction``): ``sum`` = MTRec eq. 8, per title the SUM over its
    tagged tokens of the token CE (longer titles weigh more); ``mean`` = per title the MEAN over
    its tagged tokens (what public reproductions compute).

    logits [U, L, T], tags [U, L] (-100 = padding / special token).
    """
    if reduction not in NER_REDUCTIONS:
        raise ValueError(
            f"model.ner_reduction={reduction!r}: allowed values are {', '.join(NER_REDUCTIONS)}"
        )
    U, L, T = logits.shape
    ce = F.cross_entropy(
        logits.reshape(U * L, T), tags.reshape(U * L), ignore_index=-100, reduction="none"
    ).reshape(U, L)  # [U, L], 0 at ignored tokens
    per_title = ce.sum(1)  # [U]
    if reduction == "mean":
        n_tagged = (tags != -100).sum(1)  # [U]
        per_title = per_title / n_tagged.clamp_min(1).to(per_title.dtype)
    return per_title


def ner_loss(
    logits: torch.Tensor,
    tags: torch.Tensor,
    hist_count: torch.Tensor,
    owner_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """:func:`ner_per_title` averaged over history occurrences of titles with at least one
    tagged token (tags != -100); the occurrence weighting over titles (and ``owner_weight``
    under global de-duplication, ``dedup.loss_weights``) is the same for both reductions.

    logits [U, L, T], tags [U, L], hist_count [U]; ``owner_weight`` [U] or None.
    """
    per_title = ner_per_title(logits, tags, reduction)  # [U]
    return loss_weights(hist_count, (tags != -100).any(1), owner_weight).reduce(per_title)


def nce_loss(
    scores: torch.Tensor, cand_mask: torch.Tensor, sample_mask: torch.Tensor
) -> torch.Tensor:
    """Main task, MTRec eq. 3: -log(exp(s+) / (exp(s+) + sum_j exp(s_j))) with the clicked
    candidate at index 0 and the K negatives after it, averaged over REAL samples.

    scores [B, C] (masked candidates may be -inf), cand_mask [B, C], sample_mask [B].
    Masked candidates are filled with the dtype's finite minimum (exp underflows to exactly 0,
    as with -inf), so padding samples give a finite value that the zero weight then drops.
    """
    logits = scores.masked_fill(~cand_mask, torch.finfo(scores.dtype).min)  # [B, C]
    nll = -torch.log_softmax(logits, dim=1)[:, 0]  # [B]
    return weighted_mean(nll, sample_mask.to(nll.dtype))
