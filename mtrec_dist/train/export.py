"""Write the self-describing run folder the evaluator reads (docs/design.md §7 The run folder).

``export/model.safetensors`` holds the whole model (fp32); ``export/encoder/`` holds the news
encoder and its tokenizer as transformers' ``save_pretrained`` folder, so users can load the
fine-tuned BERT without this package. ``export/meta.json`` says what produced them.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtrec_dist.config import Config, dump_config
from mtrec_dist.data.prepared import vocab_fingerprint
from mtrec_dist.hub import load_tokenizer, quiet_transformers
from mtrec_dist.utils import atomic_write_json, sha256_file


def _news_encoder(model: torch.nn.Module):
    """The transformers BERT inside the model, LoRA adapters merged into plain weights."""
    enc = getattr(model, "encoder", None)
    enc = getattr(enc, "bert", enc)
    if enc is None or not hasattr(enc, "save_pretrained"):
        return None
    if not any("lora_" in n for n, _ in enc.named_parameters()):
        return enc

    merged = copy.deepcopy(enc)
    for module in merged.modules():
        if hasattr(module, "merge") and hasattr(module, "base_layer"):
            module.merge()  # peft LoRA layer: W <- W + scale * B A
    plain = type(enc)(enc.config, add_pooling_layer=False)
    sd = {
        k.replace(".base_layer.", "."): v
        for k, v in merged.state_dict().items()
        if "lora_" not in k
    }
    plain.load_state_dict(sd, strict=False)
    return plain


def export_run(
    model: torch.nn.Module,
    cfg: Config,
    manifest: dict,
    step: int,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Export weights, encoder and meta into ``cfg.run_dir/export`` atomically (folder swap)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    final = run_dir / "export"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".export."))
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    save_file(sd, str(tmp / "model.safetensors"))
    enc = _news_encoder(model)
    if enc is not None and hasattr(enc, "save_pretrained"):
        with quiet_transformers():
            enc.save_pretrained(str(tmp / "encoder"))
        load_tokenizer(cfg.model.encoder).save_pretrained(str(tmp / "encoder"))
    atomic_write_json(
        tmp / "meta.json",
        {
            "step": step,
            "model": cfg.model.name,
            "encoder": cfg.model.encoder,
            "tokenizer": manifest.get("tokenizer", {}),
            "vocab_sha256": vocab_fingerprint(cfg.prepared_dir),
            "model_sha256": sha256_file(tmp / "model.safetensors"),
        },
    )
    old = run_dir / ".export.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
