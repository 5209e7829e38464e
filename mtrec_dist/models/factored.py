"""MTRec's fast scorer: scores from cached news vectors without a user-encoder pass per slot.

MTRec's user vector is additive attention over the clicked news vectors (eq. 1), its score a
dot product (eq. 2)::

    a_i = q . tanh(W r_i + b)        w = softmax(a) over the history        u = sum_i w_i r_i
    s_j = (r_j . u) * scale

The logit ``a_i`` depends on the news alone. With the news vectors fixed (evaluation) it is
computed once per news row, ``[N, D] x [D, Q]``, instead of once per history slot of every
impression (``[impressions x H, D] x [D, Q]``, most of the old scoring time). What is left per
impression is a softmax over at most H scalars, one sparse row of ``W [impressions, N] @ V``
(the user vectors; ``W`` holds the attention weights at the history's news rows) and one
sampled dot product per candidate (``torch.sparse.sampled_addmm``: only the entries of
``U @ V^T`` at the (impression, candidate) pairs). No padded ``[B, H, D]`` or ``[B, C, D]``
tensor is built, so no batching by length is needed.

Given the per-news logits (computed over the whole news table in fixed chunks, so the same on
every worker), every score is a function of its impression alone (each softmax row, sparse row
and sampled dot product is computed on its own), so the scores do not depend on how
impressions are grouped into chunks, parts or workers. They equal ``model.score_news_vectors``
up to float32 rounding (other summation order); the tests compare both.

Which models: the evaluator asks the model (``NewsRecModel.fast_scorer``, docs/design.md §3).
``MTRec.fast_scorer`` builds an :class:`AttentionDotScorer` when its ``score_news_vectors`` is
MTRec's own and its user encoder is exactly the additive-attention one (``mtrec``, ``bert``,
``mtrec_amf``, ``bert_amf``); every other model answers None and takes the general path.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from mtrec_dist.models.user import AdditiveAttention
from mtrec_dist.utils import offsets_of

CHUNK = 8192  # impressions per sparse product (bounds the [chunk, D] user vectors' memory)
LOGIT_CHUNK = 8192  # news rows per attention-logit product


def _csr(n_rows: int, rows: np.ndarray, cols: np.ndarray, n_cols: int) -> tuple:
    """CSR index arrays of (row, col) pairs, sorted by row then column, duplicates merged ->
    (crow [n_rows + 1], col [nnz], inverse [pairs] = each pair's entry).

    ``np.unique(keys, return_inverse=True)`` computed with a stable sort: the pairs come
    grouped by row (impression), so the keys are runs of ascending blocks that timsort merges
    in about a third of quicksort's time; the result is the same integers either way.
    """
    keys = rows * np.int64(n_cols) + cols
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.ones(ordered.size, dtype=bool)  # the first pair of each distinct key
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    key = ordered[first]
    inverse = np.empty(keys.size, dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    crow = offsets_of(np.bincount(key // n_cols, minlength=n_rows))
    return torch.from_numpy(crow), torch.from_numpy(key % n_cols), torch.from_numpy(inverse)


def _sparse_csr(crow, col, values, size: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor, its index invariants checked (sorted, unique columns per row)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=True)


class AttentionDotScorer:
    """Scores of MTRec-family models from the news vectors ``[N, D]`` (see the module text);
    a :class:`~mtrec_dist.models.base.FastScorer`."""

    def __init__(self, attention: AdditiveAttention, scale: float, vectors: np.ndarray):
        """``attention``: the model's ``AdditiveAttention`` (``proj``, ``query``); ``scale``:
        the model's ``score_scale``; ``vectors``: every news row's vector (rows not needed may
        be anything finite)."""
        # computed where the attention's parameters are (the evaluator's GPU, docs/design.md
        # §8), in float32 whatever their dtype (a bf16-trained model scores fp32 vectors)
        self.device = attention.query.device
        with warnings.catch_warnings():  # a read-only memory map: only ever read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            vecs = torch.from_numpy(np.asarray(vectors, dtype=np.float32))  # [N, D]
        self.vectors = vecs.to(self.device)
        self.scale = float(scale)
        n = self.vectors.shape[0]
        logits = torch.empty(n, dtype=torch.float32, device=self.device)
        proj = attention.proj
        weight, query = proj.weight.float(), attention.query.float()
        bias = None if proj.bias is None else proj.bias.float()
        with torch.no_grad():
            for i in range(0, n, LOGIT_CHUNK):  # fixed chunks: the same logits on every worker
                v = self.vectors[i : i + LOGIT_CHUNK]
                logits[i : i + LOGIT_CHUNK] = torch.tanh(F.linear(v, weight, bias)) @ query
        self.logits = logits  # [N] a_i of every news row

    def scores(
        self, hist: np.ndarray, hist_len: np.ndarray, cand: np.ndarray, sizes: np.ndarray
    ) -> np.ndarray:
        """Flat float32 scores of impressions given as flat arrays: history rows ``hist``
        (``hist_len[i]`` per impression, oldest first) and candidate rows ``cand``
        (``sizes[i]`` per impression), in impression and candidate order."""
        hist_len = np.asarray(hist_len, dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        h_off, c_off = offsets_of(hist_len), offsets_of(sizes)
        out = np.empty(int(c_off[-1]), dtype=np.float32)
        for lo in range(0, hist_len.size, CHUNK):
            hi = min(lo + CHUNK, hist_len.size)
            out[c_off[lo] : c_off[hi]] = self._chunk(
                np.asarray(hist[h_off[lo] : h_off[hi]], dtype=np.int64),
                hist_len[lo:hi],
                np.asarray(cand[c_off[lo] : c_off[hi]], dtype=np.int64),
                sizes[lo:hi],
            )
        return out

    @torch.no_grad()
    def _chunk(
        self, hist: np.ndarray, hist_len: np.ndarray, cand: np.ndarray, sizes: np.ndarray
    ) -> np.ndarray:
        n, n_news, dev = hist_len.size, self.vectors.shape[0], self.device
        # attention weights: softmax over each history, as masked_softmax on a padded [n, H]
        imp_h = np.repeat(np.arange(n), hist_len)
        slot = np.arange(hist.size) - np.repeat(offsets_of(hist_len)[:-1], hist_len)
        H = max(int(hist_len.max()) if n else 0, 1)
        logits = torch.full((n, H), torch.finfo(torch.float32).min, device=dev)
        mask = torch.zeros((n, H), dtype=torch.bool, device=dev)
        ih, sl = torch.from_numpy(imp_h).to(dev), torch.from_numpy(slot).to(dev)
        logits[ih, sl] = self.logits[torch.from_numpy(hist).to(dev)]
        mask[ih, sl] = True
        weights = (torch.softmax(logits, dim=1) * mask)[ih, sl]  # [hist slots]
        # user vectors: U = W @ V, W [n, N] sparse (a news clicked twice: weights summed)
        crow, col, inv = (t.to(dev) for t in _csr(n, imp_h, hist, n_news))
        w = torch.zeros(col.numel(), dtype=torch.float32, device=dev).index_add_(0, inv, weights)
        W = _sparse_csr(crow, col, w, (n, n_news))
        users = W @ self.vectors  # [n, D]
        # scores: U @ V^T at the (impression, candidate) pairs only
        crow, col, inv = (t.to(dev) for t in _csr(n, np.repeat(np.arange(n), sizes), cand, n_news))
        pattern = _sparse_csr(crow, col, torch.zeros(col.numel(), device=dev), (n, n_news))
        s = torch.sparse.sampled_addmm(pattern, users, self.vectors.T, beta=0.0).values()
        return (s[inv] * self.scale).cpu().numpy()
