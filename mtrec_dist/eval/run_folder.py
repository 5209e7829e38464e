"""A run folder as the evaluator reads it: the exported model, its config, and the prepared data
it must be evaluated on (docs/design.md §7 The run folder lists the files).

The checks here refuse a model on data it cannot read correctly: another tokenizer (token ids
mean other words) or other category/entity vocabularies (ids mean other classes).

Every read of the prepared folder's manifest and vocabularies by the evaluator goes through
:func:`read_manifest` and :func:`vocab_sha256` below (one import site for that module).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

from mtrec_dist.config import Config, ConfigError, load_config
from mtrec_dist.data import prepared as _prepared
from mtrec_dist.data.prepared import load_manifest, vocab_fingerprint
from mtrec_dist.hub import load_tokenizer, tokenizer_fingerprint
from mtrec_dist.models import registry  # called as registry.build_model (tests replace it)
from mtrec_dist.models.base import NewsRecModel
from mtrec_dist.utils import sha256_file


def read_manifest(prepared: str | Path) -> dict:
    """The prepared folder's ``manifest.json`` (shards, splits, news count, tokenizer)."""
    return load_manifest(Path(prepared))


def vocab_sha256(prepared: str | Path) -> str:
    """Fingerprint of the prepared folder's category/subcategory/entity vocabularies."""
    return vocab_fingerprint(prepared)


def split_info(manifest: dict, split: str, prepared: str | Path) -> dict:
    """The manifest's entry for ``split``; the prepared folder's DataError if absent."""
    return _prepared.split_info(manifest, split, prepared)


def is_labeled(manifest: dict, split: str, prepared: str | Path) -> bool:
    """Whether the split carries click labels (as the manifest says; MIND's test does not)."""
    return _prepared.is_labeled(manifest, split, prepared)


def load_run(
    run_dir: str | Path, overrides: Sequence[str] = ()
) -> tuple[NewsRecModel, Config, dict, str]:
    """(model with the exported weights, on the CPU, Config, manifest, sha256 of
    model.safetensors).

    Refuses a checkpoint whose tokenizer or vocabularies differ from the prepared data's
    (ConfigError naming the fix). ``overrides`` (``eval.key=value``) change how this call
    evaluates (``eval.device``, ``eval.bf16``, ...), never the model or its data, which are
    the run's: any other key is a ConfigError.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    weights = run_dir / "export" / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; is {run_dir} a run folder of `mtrec train`?")
    for text in overrides:
        if not text.startswith("eval."):
            raise ConfigError(
                f"override {text!r}: only eval.* keys can be changed when evaluating a run "
                f"folder; the model, its data and training settings are {cfg_path}'s"
            )
    cfg = load_config(cfg_path, list(overrides))
    manifest = read_manifest(cfg.prepared_dir)
    check_run_tokenizer(run_dir, cfg, manifest)
    check_run_vocab(run_dir, cfg)
    model = registry.build_model(cfg, manifest)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), cfg, manifest, sha256_file(weights)


def run_tokenizer(run_dir: str | Path, cfg: Config) -> dict:
    """The checkpoint's tokenizer fingerprint (``vocab_hash``, maybe ``name``): from
    export/meta.json, else from the configured encoder's tokenizer."""
    meta_path = Path(run_dir) / "export" / "meta.json"
    if meta_path.is_file():
        tok = json.loads(meta_path.read_text(encoding="utf-8")).get("tokenizer")
        if isinstance(tok, dict) and "vocab_hash" in tok:
            return tok
        if isinstance(tok, str):
            return {"vocab_hash": tok}
    return tokenizer_fingerprint(load_tokenizer(cfg.model.encoder))


def check_run_tokenizer(run_dir: Path, cfg: Config, manifest: dict) -> None:
    """The checkpoint's tokenizer (export/meta.json, else the encoder's) must be the data's."""
    meta_path = run_dir / "export" / "meta.json"
    fp = run_tokenizer(run_dir, cfg)
    want = manifest["tokenizer"]
    if fp["vocab_hash"] != want.get("vocab_hash"):
        raise ConfigError(
            f"{meta_path}: the checkpoint's tokenizer ({fp.get('name', '?')}, vocab_hash "
            f"{fp['vocab_hash'][:16]}...) does not match the prepared data "
            f"{cfg.prepared_dir}/manifest.json ({want.get('name', '?')}, encoder "
            f"{want.get('encoder', '?')}, vocab_hash {str(want.get('vocab_hash'))[:16]}...): "
            "evaluate on data prepared with the model's encoder (data.prepared) or re-run "
            "`mtrec prepare` with model.encoder set to it"
        )


def check_run_vocab(run_dir: Path, cfg: Config) -> None:
    """The checkpoint's category/subcategory/entity vocabularies must be the data's: a model
    trained on another news table reads category and entity ids as other classes."""
    meta_path = run_dir / "export" / "meta.json"
    if not meta_path.is_file():
        return
    have = json.loads(meta_path.read_text(encoding="utf-8")).get("vocab_sha256")
    want = vocab_sha256(cfg.prepared_dir)
    if have is not None and have != want:
        raise ConfigError(
            f"{meta_path}: the checkpoint was trained on a news table with other vocabularies "
            f"(vocab_sha256 {have[:16]}...) than {cfg.prepared_dir}/vocab ({want[:16]}...): "
            "evaluate on the prepared folder the run was trained on (data.prepared in "
            f"{run_dir}/config.yaml)"
        )
