"""User encoders: clicked-news vectors [B, H, D] + history mask [B, H] -> user vector [B, D].

Masked slots never contribute. A sample whose history has no real slot gets the ZERO user
vector (so every candidate scores 0) — never NaN: attention weights are computed with a
finite fill for masked logits and then multiplied by the mask.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``mask`` positions only; all-masked rows give all-zero weights (not NaN)."""
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=dim) * mask.to(logits.dtype)


class AdditiveAttention(nn.Module):
    """Additive attention pooling, MTRec eq. 1 (user encoder) and eq. 4 (field fusion):
    a_i = softmax_i(q . tanh(W r_i)), pooled = sum_i a_i r_i.

    ``W`` is [query_dim x in_dim] with a bias (as in NRMS/NAML); ``q`` a trainable query
    vector of size ``query_dim`` (200 in MTRec, Appendix A).
    """

    def __init__(self, in_dim: int, query_dim: int = 200):
        super().__init__()
        self.proj = nn.Linear(in_dim, query_dim)
        self.query = nn.Parameter(torch.empty(query_dim).uniform_(-0.1, 0.1))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, D], mask [B, N] bool -> (pooled [B, D], weights [B, N])."""
        logits = torch.tanh(self.proj(x)) @ self.query  # [B, N]
        if mask is None:
            mask = torch.ones_like(logits, dtype=torch.bool)
        w = masked_softmax(logits, mask)  # [B, N]
        return (w.unsqueeze(-1) * x).sum(1), w


class AttentionUserEncoder(nn.Module):
    """MTRec's user encoder (eq. 1): additive attention over the clicked news vectors."""

    def __init__(self, dim: int, query_dim: int = 200):
        super().__init__()
        self.attention = AdditiveAttention(dim, query_dim)

    def forward(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hist [B, H, D], mask [B, H] -> user [B, D]."""
        return self.attention(hist, mask)[0]


def nrms_heads(dim: int, preferred: int = 16) -> int:
    """NRMS uses 16 heads; when ``dim`` is not divisible by 16 take the largest divisor of
    ``dim`` below 16 (e.g. D=384 -> 16 heads of 24; D=36 -> 12 heads of 3)."""
    return max(h for h in range(1, preferred + 1) if dim % h == 0)


class NRMSUserEncoder(nn.Module):
    """NRMS+BERT (Wu et al. 2021b, MTRec Table 1): multi-head self-attention over the clicked
    news vectors, then additive attention. The output keeps the news dimension D (heads of
    size D / n_heads, see :func:`nrms_heads`) so that scores stay dot products with [CLS].

    Padded slots are keys masked out of self-attention; a sample with no real slot attends
    over all slots (to avoid an all-masked softmax) and is zeroed by the final additive
    attention, which sees only real slots.
    """

    def __init__(self, dim: int, query_dim: int = 200, heads: int = 16):
        super().__init__()
        self.self_attention = nn.MultiheadAttention(dim, nrms_heads(dim, heads), batch_first=True)
        self.attention = AdditiveAttention(dim, query_dim)

    def forward(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hist [B, H, D], mask [B, H] -> user [B, D]."""
        empty = ~mask.any(1, keepdim=True)  # [B, 1]
        key_padding = ~(mask | empty)  # [B, H] True = ignore
        ctx, _ = self.self_attention(hist, hist, hist, key_padding_mask=key_padding)  # [B, H, D]
        return self.attention(ctx, mask)[0]


class GRUUserEncoder(nn.Module):
    """LSTUR+BERT (MTRec Table 1): a GRU over the clicked news, most recent last; the user
    vector is the hidden state at the LAST REAL slot.

    Histories are left-aligned (real slots first, padding after, as ``collate`` writes them),
    so the output at position len-1 of the padded run equals the packed run's final state.
    LSTUR's long-term user-ID embedding (its GRU initial state) is not used: batches carry no
    user ids, so h0 = 0 (the short-term part of LSTUR only). Empty history -> zero vector.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hist [B, H, D], mask [B, H] (a prefix of real slots) -> user [B, D]."""
        out, _ = self.gru(hist)  # [B, H, D]
        n = mask.sum(1)  # [B]
        last = (n - 1).clamp_min(0)  # [B]
        user = out[torch.arange(out.shape[0], device=out.device), last]  # [B, D]
        return user * (n > 0).unsqueeze(-1).to(user.dtype)


def build_user_encoder(kind: str, dim: int, query_dim: int) -> nn.Module:
    """``attention`` (MTRec), ``nrms`` or ``gru`` (LSTUR)."""
    if kind == "attention":
        return AttentionUserEncoder(dim, query_dim)
    if kind == "nrms":
        return NRMSUserEncoder(dim, query_dim)
    if kind == "gru":
        return GRUUserEncoder(dim)
    raise ValueError(f"unknown user encoder {kind!r}; allowed: attention, nrms, gru")
