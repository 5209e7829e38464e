"""Parameter groups of the one optimizer both trainers use (train/optim.py, docs/design.md §5):
which parameters get trainer.encoder_lr and which no weight decay, and one AdamW step against
its closed form for each group's own lr and decay, under the warm-up schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtrec_dist.config import ModelConfig, TrainerConfig
from mtrec_dist.hub import load_encoder
from mtrec_dist.models.mtrec import MTRec
from mtrec_dist.train.optim import (
    build_optimizer,
    build_scheduler,
    linear_warmup_decay,
    param_groups,
)

META = {"has_sentiment": False, "vocab": {"category": 5, "subcategory": 1, "entities": 3}}
LR, ENC_LR, WD, EPS = 1e-2, 1e-3, 0.1, 1e-8


def mtrec() -> MTRec:
    torch.manual_seed(0)
    cfg = ModelConfig(name="mtrec", encoder="tiny", tasks={"category": True, "ner": True})
    return MTRec(cfg, META, load_encoder("tiny")).double()


def trainer(**kw) -> TrainerConfig:
    return TrainerConfig(**{"lr": LR, "encoder_lr": ENC_LR, "weight_decay": WD, **kw})


def by_name(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    """parameter name -> the group holding it."""
    where = {id(p): g for g in groups for p in g["params"]}
    return {n: where[id(p)] for n, p in model.named_parameters() if id(p) in where}


def test_groups_of_a_bert_model():
    model = mtrec()
    groups = param_groups(model, trainer())
    assert [g["name"] for g in groups] == ["rest", "rest_no_decay", "encoder", "encoder_no_decay"]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [
        (LR, WD), (LR, 0.0), (ENC_LR, WD), (ENC_LR, 0.0)
    ]  # fmt: skip
    seen = by_name(model, groups)
    assert set(seen) == {n for n, _ in model.named_parameters()}  # each exactly once
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    layer_norms = {
        f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
        for p, _ in mod.named_parameters()
    }  # fmt: skip
    assert layer_norms  # the tiny BERT has them (embeddings and every layer)
    for n, g in seen.items():
        assert g["lr"] == (ENC_LR if n.startswith("encoder.") else LR), n
        no_decay = n.endswith(".bias") or n in layer_norms
        assert g["weight_decay"] == (0.0 if no_decay else WD), n
    assert seen["encoder.bert.embeddings.LayerNorm.weight"]["name"] == "encoder_no_decay"
    assert seen["heads.category.linear.weight"]["name"] == "rest"
    assert seen["heads.category.linear.bias"]["name"] == "rest_no_decay"
    # model order inside each group: identical on every rank
    order = [n for n, _ in model.named_parameters()]
    for g in groups:
        names = [n for n, p in model.named_parameters() if any(p is q for q in g["params"])]
        assert names == [n for n in order if n in names]


def test_one_rate_and_no_decay_is_one_group_in_model_order():
    """encoder_lr = 0 and weight_decay = 0: today's single group, every parameter in order."""
    model = mtrec()
    groups = param_groups(model, TrainerConfig(lr=LR))
    assert len(groups) == 1 and groups[0]["lr"] == LR and groups[0]["weight_decay"] == 0.0
    assert groups[0]["name"] == "rest+rest_no_decay+encoder+encoder_no_decay"
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters()]
    # one rate with decay: two groups, decay and no decay
    two = param_groups(model, TrainerConfig(lr=LR, weight_decay=WD))
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in two] == [
        ("rest+encoder", LR, WD), ("rest_no_decay+encoder_no_decay", LR, 0.0)
    ]  # fmt: skip


def test_frozen_parameters_are_skipped_and_empty_groups_dropped():
    model = mtrec()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, trainer())
    assert [g["name"] for g in groups] == ["rest", "rest_no_decay"]
    assert all(p.requires_grad for g in groups for p in g["params"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer(model, trainer())


@pytest.mark.parametrize("name", ["nrms", "naml", "lstur", "npa"])
def test_classic_encoders_train_at_trainer_lr(name):
    """The classic models' ``encoder`` is trained from scratch: no encoder_lr group."""
    from tests.unit.test_models_classic import make

    model = make(name)
    assert any(n.startswith("encoder.") for n, _ in model.named_parameters())
    assert {g["lr"] for g in param_groups(model, trainer())} == {LR}


def test_adamw_step_by_hand_per_group():
    """One step at scheduler step 0 (lr = peak x 1/warm-up steps) on known gradients: AdamW's
    first update is p <- p (1 - lr wd) - lr g / (|g| + eps) (m-hat = g, v-hat = g^2), with each
    group's own peak lr and decay."""
    model = mtrec()
    t = trainer(adam_eps=EPS)
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, total_steps=10, warmup_ratio=0.4)  # 4 warm-up steps
    f0 = linear_warmup_decay(10, 0.4)(0)
    assert f0 == 0.25
    assert [g["lr"] for g in opt.param_groups] == [LR * f0, LR * f0, ENC_LR * f0, ENC_LR * f0]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    before = {}
    for n, p in params.items():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        before[n] = p.detach().clone()
    opt.step()
    sched.step()
    cases = {  # name: (peak lr, weight decay)
        "encoder.bert.encoder.layer.0.attention.self.query.weight": (ENC_LR, WD),
        "encoder.bert.embeddings.LayerNorm.weight": (ENC_LR, 0.0),
        "encoder.bert.encoder.layer.0.output.dense.bias": (ENC_LR, 0.0),
        "heads.category.linear.weight": (LR, WD),
        "heads.ner.linear.bias": (LR, 0.0),
        "user_encoder.attention.proj.weight": (LR, WD),
    }
    for n, (peak, wd) in cases.items():
        lr, g, p0 = peak * f0, params[n].grad, before[n]
        expect = p0 * (1 - lr * wd) - lr * g / (g.abs() + EPS)
        torch.testing.assert_close(params[n].detach(), expect, rtol=0, atol=1e-15, msg=n)
    # the decay matters: a decayed weight moved by more than its gradient step
    w = "heads.category.linear.weight"
    no_decay = before[w] - LR * f0 * params[w].grad / (params[w].grad.abs() + EPS)
    assert (params[w].detach() - no_decay).abs().max() > 1e-6
    f1 = linear_warmup_decay(10, 0.4)(1)
    assert [g["lr"] for g in opt.param_groups] == [LR * f1, LR * f1, ENC_LR * f1, ENC_LR * f1]
