"""AdamW with linear warm-up then linear decay: the papers' schedule, defined once.

MTRec Appendix A: "learning rate 2e-5, linearly decayed with 10% warmup steps". The same
``lr_lambda`` drives the single-process trainer and the DeepSpeed engines, so the two agree
step for step (the N-workers == 1-process tests depend on it).
"""

from __future__ import annotations

import math

import torch


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_steps * warmup_ratio))


def linear_warmup_decay(total_steps: int, warmup_ratio: float):
    """Multiplier of the peak lr at optimizer step ``s`` (0-based): ramps up, then decays to 0."""
    warm = warmup_steps(total_steps, warmup_ratio)

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return max(0.0, (total_steps - s) / max(1, total_steps - warm))

    return f


def build_optimizer(params, lr: float, weight_decay: float, eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=lr,
        weight_decay=weight_decay,
        betas=(0.9, 0.999),
        eps=eps,
    )


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(total_steps, warmup_ratio)
    )
