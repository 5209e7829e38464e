"""Hand-written news tables and samples for the model tests (MINER, UNBERT)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from mtrec_dist.data.batch import Sample

CLS, SEP = 101, 102


def title_table(titles: list[list[int]], category: list[int] | None = None) -> SimpleNamespace:
    """In-memory stand-in for NewsTable (the attributes collate() reads): row i is
    ``[CLS] titles[i] [SEP]`` padded to 6 word pieces, no NER tags, no sentiment."""
    L, n = 6, len(titles)
    tokens = np.zeros((n, L), dtype=np.int32)
    for i, t in enumerate(titles):
        row = [CLS, *t, SEP]
        tokens[i, : len(row)] = row
    return SimpleNamespace(
        tokens=tokens,
        ner=np.full((n, L), 255, dtype=np.uint8),
        category=np.array(category if category is not None else [0] * n, dtype=np.int16),
        subcategory=np.zeros(n, dtype=np.int16),
        sentiment=np.full(n, -1, dtype=np.int8),
        entities=np.zeros((n, 2), dtype=np.int32),
    )


def sample(hist: list[int], cand: list[int]) -> Sample:
    """Impression 0: history ``hist``, candidates ``cand``, the first one clicked."""
    labels = np.zeros(len(cand), dtype=np.float32)
    labels[0] = 1
    return Sample(0, np.array(hist, dtype=np.int64), np.array(cand, dtype=np.int64), labels)
