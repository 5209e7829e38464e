"""Write the self-describing run folder the evaluator reads (docs/design.md §7 The run folder).

``export/model.safetensors`` holds the whole model (fp32); ``export/encoder/`` holds the news
encoder and its tokenizer as transformers' ``save_pretrained`` folder, so users can load the
fine-tuned BERT without this package. ``export/meta.json`` says what produced them.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from mtrec_dist.config import Config, dump_config
from mtrec_dist.data.prepared import vocab_fingerprint
from mtrec_dist.hub import load_tokenizer, quiet_transformers
from mtrec_dist.models.base import NewsRecModel
from mtrec_dist.utils import atomic_swap_dir, atomic_write_json, sha256_file

if TYPE_CHECKING:  # transformers is slow to import; only the annotation needs it
    from transformers import PreTrainedModel


def _news_encoder(model: NewsRecModel) -> PreTrainedModel | None:
    """The transformers BERT inside the model (its ``pretrained_encoder()``), LoRA adapters
    merged into plain weights; None for a model without a pretrained encoder."""
    news_encoder = model.pretrained_encoder()
    if news_encoder is None:
        return None
    enc = news_encoder.bert
    if not any("lora_" in n for n, _ in enc.named_parameters()):
        return enc
    from peft.tuners.lora import LoraLayer  # lazy: peft only for model.lora

    merged = copy.deepcopy(enc)
    for module in merged.modules():
        if isinstance(module, LoraLayer):
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
    model: NewsRecModel,
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
    if enc is not None:
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
    atomic_swap_dir(tmp, final)
    return final
