"""build_model validation: every user mistake is a ConfigError (or the hub's error) naming the
key and the allowed values, raised before any encoder is loaded."""

from __future__ import annotations

import json

import pytest
import torch

import mtrec_dist.hub as hub
from mtrec_dist.config import Config, ConfigError
from mtrec_dist.models import mtrec as m
from mtrec_dist.models.encoders import name_embeddings
from mtrec_dist.models.registry import MODEL_NAMES, MODELS, build_model

MANIFEST = {
    "news": {"has_sentiment": False, "vocab": {"category": 4, "subcategory": 2, "entities": 3}}
}


def cfg_with(**model) -> Config:
    cfg = Config()
    cfg.model.encoder = "tiny"
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.fixture
def no_encoder(monkeypatch):
    """Validation must fail before any encoder is loaded."""

    def boom(name):
        raise AssertionError("encoder loaded before validation")

    monkeypatch.setattr(hub, "load_encoder", boom)


def test_names_and_classes():
    assert tuple(MODELS) == MODEL_NAMES == (
        "mtrec", "bert", "mtrec_amf", "bert_amf", "nrms_bert", "lstur_bert", "miner", "unbert",
        "nrms", "naml", "lstur", "stur", "npa",
    )  # fmt: skip
    assert "miner" in MODELS and "gpt" not in MODELS
    assert MODELS["mtrec"] is m.MTRec and MODELS["lstur_bert"] is m.LSTURBert
    assert MODELS.get("nope") is None


@pytest.mark.parametrize("name", ["mtrec", "bert_amf", "lstur_bert"])
def test_build_model_builds_the_named_class(name):
    model = build_model(cfg_with(name=name), MANIFEST)
    assert type(model) is MODELS[name]
    assert model.encoder.hidden_size == 32


@pytest.mark.parametrize(
    "model, texts",
    [
        ({"name": "mtrc"}, ["model.name='mtrc'", "mtrec, bert, mtrec_amf", "unbert"]),
        (
            {"tasks": {"category": True, "topic": True}},
            ["model.tasks.topic", "category, ner, sentiment, disagreement"],
        ),
        (
            {"tasks": {"category": True, "sentiment": True}},
            ["model.tasks.sentiment", "has_sentiment=false"],
        ),
        (
            {"groups": {"main": {"main": 1.0}, "aux": {"category": 0.3, "catgory": 0.3}}},
            ["model.groups.aux.catgory", "main, category, ner, sentiment, disagreement"],
        ),
        ({"miner_aggregator": "sum"}, ["model.miner_aggregator='sum'", "max, mean, weighted"]),
        ({"unbert_aggregator": "cls"}, ["model.unbert_aggregator='cls'", "nsep, mean, attention"]),
    ],
)
def test_config_errors_name_key_and_allowed_values(model, texts, no_encoder):
    with pytest.raises(ConfigError) as e:
        build_model(cfg_with(**model), MANIFEST)
    for t in texts:
        assert t in str(e.value)


def test_sentiment_allowed_when_the_data_has_it():
    manifest = {"news": {**MANIFEST["news"], "has_sentiment": True}}
    model = build_model(
        cfg_with(tasks={"category": True, "ner": False, "sentiment": True}), manifest
    )
    assert set(model.heads) == {"category", "sentiment"}
    assert model.heads["sentiment"].linear.out_features == 3
    assert model.heads["category"].linear.out_features == 4


def test_encoder_folder_missing(tmp_path, no_encoder):
    with pytest.raises(FileNotFoundError) as e:
        build_model(cfg_with(encoder=str(tmp_path / "nope")), MANIFEST)
    assert "model.encoder=" in str(e.value) and "'minilm', 'tiny'" in str(e.value)


def test_encoder_not_bert_family(tmp_path, no_encoder):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError) as e:
        build_model(cfg_with(encoder=str(tmp_path)), MANIFEST)
    msg = str(e.value)
    assert "model.encoder=" in msg and "'gpt2'" in msg and "allowed: bert, roberta" in msg


def test_unknown_lora_target_names_the_key():
    with pytest.raises(ConfigError) as e:
        build_model(cfg_with(lora=True, lora_targets=["qkv_proj"]), MANIFEST)
    assert "model.lora_targets=['qkv_proj']" in str(e.value) and "query" in str(e.value)


def test_amf_names_read_from_prepared_vocab(tmp_path):
    """build_model feeds vocab/category.json and vocab/entities.json to the AMF init."""
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    cats = ["<unk>", "sports", "finance", "travel"]
    ents = [{"id": "<none>"}, {"id": "Q90", "surface": "Paris", "type": "G"},
            {"id": "Q35", "surface": "Denmark", "type": "G"}]  # fmt: skip
    (vocab / "category.json").write_text(json.dumps(cats))
    (vocab / "entities.json").write_text(json.dumps(ents))
    cfg = cfg_with(name="bert_amf", amf_dim=5)
    cfg.data.prepared = str(tmp_path)
    model = build_model(cfg, MANIFEST)
    tok = hub.load_tokenizer("tiny")
    want = name_embeddings(["Paris", "Denmark"], model.encoder, tok, 5)
    torch.testing.assert_close(model.fusion.entity_emb.weight[1:].detach(), want)
    want = name_embeddings(cats[1:], model.encoder, tok, 5)
    torch.testing.assert_close(model.fusion.category_emb.weight[1:].detach(), want)


def test_resolve_groups_asks_the_model(tiny_cfg):
    """Groups are narrowed to the tasks the built model returns; mismatches fail early."""
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.models.registry import build_model, computed_tasks, resolve_groups

    def groups(*o):
        cfg = tiny_cfg(*o)
        model = build_model(cfg, load_manifest(cfg.prepared_dir))
        return computed_tasks(model, cfg.prepared_dir), resolve_groups(cfg, model)

    tasks, g = groups()
    assert tasks == ["main", "category", "ner"]
    assert g == {"main": {"main": 1.0}, "aux": {"category": 0.3, "ner": 0.3}}
    assert groups("model.tasks.ner=false")[1] == {"main": {"main": 1.0}, "aux": {"category": 0.3}}
    tasks, g = groups("model.name=bert", "trainer.surgery=none")
    assert tasks == ["main"] and g == {"main": {"main": 1.0}}
    with pytest.raises(ConfigError, match=r"trainer.surgery=mtrec needs exactly 2 gradient groups"):
        groups("model.name=bert")
    with pytest.raises(
        ConfigError, match=r"task\(s\) disagreement of model miner are in no gradient group"
    ):
        groups("model.name=miner", "trainer.surgery=none")
    tasks, g = groups(
        "model.name=miner", "model.groups.main.disagreement=0.8", "trainer.surgery=none"
    )
    assert g == {"main": {"main": 1.0, "disagreement": 0.8}}
