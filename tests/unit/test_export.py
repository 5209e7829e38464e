"""The exported run folder reloads into identical models (ours and transformers')."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModel

from mtrec_dist.data.batch import NewsTable, Sample, collate
from mtrec_dist.data.prepared import load_manifest
from mtrec_dist.models.registry import build_model
from mtrec_dist.train.export import export_run
from mtrec_dist.utils import sha256_file


def _batch(cfg):
    table = NewsTable(cfg.prepared_dir)
    import numpy as np

    s = [
        Sample(1, np.array([3, 4, 5]), np.array([6, 7, 8, 9, 10]), np.array([1, 0, 0, 0, 0], "f4"))
    ]
    return collate(s, table)


def _perturb(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_export_reloads_whole_model_and_encoder(tiny_cfg):
    cfg = tiny_cfg()
    manifest = load_manifest(cfg.prepared_dir)
    model = build_model(cfg, manifest).eval()
    _perturb(model)
    out = export_run(model, cfg, manifest, step=7)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["step"] == 7 and meta["model"] == "mtrec"
    assert meta["model_sha256"] == sha256_file(out / "model.safetensors")
    assert meta["tokenizer"]["vocab_hash"] == manifest["tokenizer"]["vocab_hash"]
    from mtrec_dist.data.prepared import vocab_fingerprint

    assert meta["vocab_sha256"] == vocab_fingerprint(cfg.prepared_dir)

    again = build_model(cfg, manifest).eval()
    again.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    b = _batch(cfg)
    with torch.no_grad():
        assert torch.equal(model(b).scores, again(b).scores)
        hf = AutoModel.from_pretrained(str(out / "encoder")).eval()
        x, a = b.tokens, b.attention_mask
        ref = model.encoder.bert(input_ids=x, attention_mask=a).last_hidden_state
        assert torch.allclose(hf(input_ids=x, attention_mask=a).last_hidden_state, ref, atol=1e-6)


def test_lora_export_merges_adapters(tiny_cfg):
    cfg = tiny_cfg("model.lora=true")
    manifest = load_manifest(cfg.prepared_dir)
    model = build_model(cfg, manifest).eval()
    _perturb(model)  # adapters non-zero, so merging matters
    out = export_run(model, cfg, manifest, step=1)
    hf = AutoModel.from_pretrained(str(out / "encoder")).eval()
    assert not any("lora" in n for n, _ in hf.named_parameters())
    b = _batch(cfg)
    with torch.no_grad():
        ref = model.encoder.bert(
            input_ids=b.tokens, attention_mask=b.attention_mask
        ).last_hidden_state
        got = hf(input_ids=b.tokens, attention_mask=b.attention_mask).last_hidden_state
    assert torch.allclose(got, ref, atol=1e-5)
    # and the base weights alone would differ: the adapters were really merged
    base = build_model(cfg, manifest).encoder.bert.eval()
    with torch.no_grad():
        plain = base(input_ids=b.tokens, attention_mask=b.attention_mask).last_hidden_state
    assert not torch.allclose(plain, ref, atol=1e-3)
