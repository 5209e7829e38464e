"""What every model returns (docs/design.md §3 Models contract)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskOutputs:
    losses: dict[str, torch.Tensor]  # scalar loss per task: main, category, ner, sentiment, ...
    scores: torch.Tensor  # [B, C] click scores (masked candidates: -inf)


def group_losses(
    losses: dict[str, torch.Tensor], groups: dict[str, dict[str, float]]
) -> dict[str, torch.Tensor]:
    """Gradient-group losses: ``group = sum(weight * task_loss)`` over the group's enabled tasks.

    Tasks a group names that the model did not compute (switched off) are skipped; a group
    left empty is dropped, so the trainer only ever sees groups with a gradient.
    """
    out: dict[str, torch.Tensor] = {}
    for g, members in groups.items():
        terms = [w * losses[t] for t, w in members.items() if t in losses]
        if terms:
            out[g] = torch.stack(terms).sum()
    return out
