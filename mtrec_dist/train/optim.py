"""AdamW with per-group learning rates and weight decay, and the papers' schedule, defined once.

MTRec Appendix A: "learning rate 2e-5, linearly decayed with 10% warmup steps". The same
parameter groups (:func:`param_groups`) and the same ``lr_lambda`` drive the single-process
trainer and the DeepSpeed engines (which receive this torch optimizer), so the two agree step
for step (the N-workers == 1-process tests depend on it). docs/design.md §5.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel

from mtrec_dist.config import TrainerConfig
from mtrec_dist.models.base import NewsRecModel

# Canonical group order: identical on every rank, and the first group present is the one whose
# lr is logged as ``lr`` (trainer.lr's schedule whenever a head or user-encoder parameter trains).
GROUP_ORDER = ("rest", "rest_no_decay", "encoder", "encoder_no_decay")
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)


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


def pretrained_encoder_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the pretrained language model: what a registered model names as its
    ``pretrained_encoder()`` (the BERT-family ``NewsEncoder`` of the MTRec family, MINER and
    UNBERT, LoRA adapters included; names start with ``encoder.``, docs/design.md §3).

    The classic word-embedding models (NRMS, NAML, LSTUR, NPA) also name their title encoder
    ``encoder``, but it is trained from scratch (GloVe rows at most), so it is not pretrained:
    it gets ``trainer.lr`` with the rest of the model, and this returns []. A plain module
    outside the model contract (the ZeRO tests' toy model) counts its child ``encoder`` when
    that is a transformers ``PreTrainedModel``."""
    if isinstance(model, NewsRecModel):
        enc = model.pretrained_encoder()
        return [] if enc is None else list(enc.parameters())

    enc = dict(model.named_children()).get("encoder")
    return list(enc.parameters()) if isinstance(enc, PreTrainedModel) else []


def no_decay_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters exempt from weight decay, by BERT's and HF Trainer's rule: every parameter of
    a normalisation layer (``nn.LayerNorm``, ``nn.RMSNorm``, by module type, whatever its name)
    and every bias (a parameter registered as ``bias`` on its module)."""
    out: dict[int, nn.Parameter] = {}
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, NO_DECAY_MODULES) or name == "bias":
                out[id(p)] = p
    return list(out.values())


def param_groups(model: nn.Module, t: TrainerConfig) -> list[dict]:
    """Optimizer parameter groups: ``trainer.encoder_lr`` (0 = ``trainer.lr``) for the
    pretrained encoder (:func:`pretrained_encoder_params`), ``trainer.lr`` for everything else
    (user encoder, heads, AMF embeddings, classic models' encoders); ``trainer.weight_decay``
    except for biases and normalisation weights (:func:`no_decay_params`), which get 0.

    Frozen parameters are skipped and empty groups dropped. Classes with the same (lr, weight
    decay) share one group, so with ``encoder_lr = 0`` and ``weight_decay = 0`` there is exactly
    one group (the optimizer and checkpoints of a run with one rate). Groups come in the order
    of ``GROUP_ORDER`` and hold their parameters in ``model.named_parameters()`` order: the same
    on every rank. Each group carries ``name`` (its classes joined by ``+``)."""
    enc_lr = t.encoder_lr if t.encoder_lr > 0 else t.lr
    enc = {id(p) for p in pretrained_encoder_params(model)}
    no_decay = {id(p) for p in no_decay_params(model)}
    settings = {
        "rest": (t.lr, t.weight_decay),
        "rest_no_decay": (t.lr, 0.0),
        "encoder": (enc_lr, t.weight_decay),
        "encoder_no_decay": (enc_lr, 0.0),
    }
    members: dict[str, list[nn.Parameter]] = {k: [] for k in GROUP_ORDER}
    for _, p in model.named_parameters():
        if p.requires_grad:
            part = "encoder" if id(p) in enc else "rest"
            members[part + ("_no_decay" if id(p) in no_decay else "")].append(p)
    merged: dict[tuple[float, float], list[str]] = {}
    for cls in GROUP_ORDER:
        if members[cls]:
            merged.setdefault(settings[cls], []).append(cls)
    order = {id(p): i for i, p in enumerate(model.parameters())}
    groups = []
    for (lr, wd), classes in merged.items():
        params = sorted((p for c in classes for p in members[c]), key=lambda p: order[id(p)])
        groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": "+".join(classes)})
    return groups


def build_optimizer(model: nn.Module, t: TrainerConfig) -> torch.optim.AdamW:
    """torch AdamW over :func:`param_groups` (betas 0.9/0.999 as BERT, eps ``trainer.adam_eps``).

    The DeepSpeed engine is handed this optimizer (its JSON has no ``optimizer`` section), so
    both trainers step the same groups."""
    groups = param_groups(model, t)
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter (every requires_grad is False): "
            "nothing to optimize"
        )
    return torch.optim.AdamW(
        groups, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=t.adam_eps
    )


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up then decay; LambdaLR multiplies each group's OWN peak lr by the one
    multiplier, so the encoder and the heads follow the same schedule at their own rates."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(total_steps, warmup_ratio)
    )
