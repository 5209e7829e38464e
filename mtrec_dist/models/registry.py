"""Model names -> classes, and ``build_model``: validate the model config, then build.

Everything that can be checked without weights is checked first (model name, task names,
tasks the data cannot feed, group members, aggregators, the encoder folder), so a typo fails
in a second with the key and the allowed values instead of after loading BERT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtrec_dist.config import TWO_GROUP_SURGERY, Config, ConfigError
from mtrec_dist.data.batch import NewsTable, collate
from mtrec_dist.data.prepared import require_users, vocab_names
from mtrec_dist.data.vectors import ENTITY_VECTORS_NPY
from mtrec_dist.hub import resolve_encoder
from mtrec_dist.models.base import NewsRecModel
from mtrec_dist.models.classic import LSTUR, NAML, NPA, NRMS, STUR
from mtrec_dist.models.miner import MINER
from mtrec_dist.models.mtrec import BERT, BertAMF, LSTURBert, MTRec, MTRecAMF, NRMSBert
from mtrec_dist.models.unbert import UNBERT
from mtrec_dist.tasks import ALL_TASKS, SENTIMENT, SWITCHABLE_TASKS

_AGGREGATORS = {
    "model.miner_aggregator": ("max", "mean", "weighted"),
    "model.unbert_aggregator": ("nsep", "mean", "attention"),
    "model.unbert_signals": ("both", "word", "news"),
    "model.lstur_kind": ("ini", "con"),
}


MODELS: dict[str, type[NewsRecModel]] = {
    "mtrec": MTRec,
    "bert": BERT,
    "mtrec_amf": MTRecAMF,
    "bert_amf": BertAMF,
    "nrms_bert": NRMSBert,
    "lstur_bert": LSTURBert,
    "miner": MINER,
    "unbert": UNBERT,
    # classic word-embedding baselines (mtrec_dist.models.classic)
    "nrms": NRMS,
    "naml": NAML,
    "lstur": LSTUR,
    "stur": STUR,
    "npa": NPA,
}
MODEL_NAMES = tuple(MODELS)


def validate_model_config(cfg: Config, manifest: dict) -> None:
    """Raise ConfigError naming the key and the allowed values; builds nothing."""
    m = cfg.model
    if m.name not in MODEL_NAMES:
        raise ConfigError(f"model.name={m.name!r}: allowed values are {', '.join(MODEL_NAMES)}")
    for task in m.tasks:
        if task not in SWITCHABLE_TASKS:
            raise ConfigError(
                f"model.tasks.{task}: unknown task; allowed: {', '.join(SWITCHABLE_TASKS)} "
                "(main is always on)"
            )
    news = manifest.get("news", {})
    if m.tasks.get(SENTIMENT, False) and not news.get("has_sentiment", False):
        raise ConfigError(
            "model.tasks.sentiment=true but the prepared dataset has no sentiment labels "
            "(manifest news.has_sentiment=false); set model.tasks.sentiment=false"
        )
    for group, members in m.groups.items():
        for task in members:
            if task not in ALL_TASKS:
                raise ConfigError(
                    f"model.groups.{group}.{task}: unknown task; allowed: {', '.join(ALL_TASKS)}"
                )
    for key, allowed in _AGGREGATORS.items():
        value = getattr(m, key.split(".", 1)[1])
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: allowed values are {', '.join(allowed)}")
    if m.query_dim <= 0 or m.amf_dim <= 0:
        raise ConfigError(
            f"model.query_dim={m.query_dim}, model.amf_dim={m.amf_dim}: must be positive"
        )
    if m.unbert_news_layers < 0:
        raise ConfigError(f"model.unbert_news_layers={m.unbert_news_layers}: must be >= 0")
    for key in ("word_dim", "cnn_filters", "cnn_window", "nrms_heads", "nrms_head_dim"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key}={getattr(m, key)}: must be a positive integer")
    if MODELS[m.name].needs_users:
        # LSTUR / NPA size their user-ID tables from news.vocab.users: refuse a folder
        # prepared before user ids were recorded instead of training every sample as user 0.
        require_users(manifest, cfg.prepared_dir, f"model.name={m.name}")
    if cfg.data.word_vectors and not Path(cfg.data.word_vectors).is_file():
        raise ConfigError(f"data.word_vectors={cfg.data.word_vectors!r}: no such file")
    global_dedup(cfg, cfg.trainer.num_workers)  # data.dedup=global on a model without it
    if m.train_layers != 0:
        layered = [n for n, c in MODELS.items() if c.per_title_encoder]
        if m.name not in layered:
            raise ConfigError(
                f"model.train_layers={m.train_layers}: model.name={m.name} does not encode "
                f"each title on its own through a BERT encoder (only {', '.join(layered)} do), "
                "so there is no per-news layer cache; set model.train_layers=0"
            )
        if m.lora:
            raise ConfigError(
                f"model.train_layers={m.train_layers} with model.lora=true: LoRA adapters sit in "
                "every layer, including the frozen ones; use one or the other"
            )
        if m.train_layers < -1:
            raise ConfigError(
                f"model.train_layers={m.train_layers}: allowed 0 (all), N > 0 (top N), -1 (none)"
            )
    resolve_encoder(m.encoder)  # missing folder / not BERT-family -> error naming model.encoder


def global_dedup(cfg: Config, world_size: int) -> bool:
    """``data.dedup`` resolved: True when titles are encoded once per GLOBAL micro-batch and
    exchanged across ranks (``mtrec_dist.models.dedup``).

    Only bi-encoders that declare ``global_dedup`` (the MTRec family and MINER) can: a
    cross-encoder (UNBERT) encodes a title together with its sample, and the classic models'
    news encoders are not wired to the exchange. ``auto`` = global when ``world_size`` > 1 and
    the model supports it; ``global`` on any other model is a ConfigError.
    """
    supported = MODELS[cfg.model.name].global_dedup
    if cfg.data.dedup == "global" and not supported:
        raise ConfigError(
            f"data.dedup=global: model.name={cfg.model.name} cannot exchange title vectors "
            "across ranks (only these models can: "
            f"{', '.join(n for n, c in MODELS.items() if c.global_dedup)}); "
            "set data.dedup=rank or auto"
        )
    return supported and world_size > 1 and cfg.data.dedup in ("auto", "global")


def build_model(cfg: Config, manifest: dict) -> NewsRecModel:
    """Validate ``cfg.model`` against the manifest, then build ``MODELS[cfg.model.name]``.

    ``meta`` = ``manifest["news"]``; the vocabulary names (category names, entity surface
    forms) are read from the prepared folder into ``meta["names"]`` when present.
    """
    validate_model_config(cfg, manifest)
    cls = MODELS[cfg.model.name]
    meta = dict(manifest.get("news", {}))
    # AMF initialisation and MINER's fixed category vectors read the vocabulary names.
    if "names" not in meta:
        names = vocab_names(cfg.prepared_dir)
        if names:
            meta["names"] = names
    meta.setdefault("word_vectors", cfg.data.word_vectors)  # classic models' GloVe file
    if "entity_vector_matrix" not in meta and cfg.model.amf_entity_vectors:
        ev = cfg.prepared_dir / "vocab" / ENTITY_VECTORS_NPY
        if cls.multi_field and ev.is_file():
            meta["entity_vector_matrix"] = np.load(ev, allow_pickle=False)
    return cls(cfg.model, meta)


def computed_tasks(model: NewsRecModel, prepared_dir) -> list[str]:
    """Task losses ``model`` returns, read off one all-padding batch (the models' own answer)."""
    batch = collate([], NewsTable(prepared_dir), batch_size=1)
    was = model.training
    model.eval()
    with torch.no_grad():
        tasks = list(model(batch).losses)
    model.train(was)
    return tasks


def resolve_groups(cfg: Config, model: NewsRecModel) -> dict[str, dict[str, float]]:
    """``cfg.model.groups`` restricted to the tasks ``model`` computes; checked against the surgery.

    A group none of whose tasks the model computes (the default ``aux`` group with ``bert`` or
    ``unbert``) is dropped, with a notice, so that every worker sees the same groups; a task the
    model computes but no group names never trains, which is an error.
    """
    tasks = computed_tasks(model, cfg.prepared_dir)
    groups = {
        g: {t: w for t, w in members.items() if t in tasks}
        for g, members in cfg.model.groups.items()
    }
    groups = {g: m for g, m in groups.items() if m}
    dropped = sorted(set(cfg.model.groups) - set(groups))
    if dropped:
        print(
            f"note: model {cfg.model.name} computes {', '.join(tasks)}; gradient group(s) "
            f"{', '.join(dropped)} have none of those tasks and are dropped",
            flush=True,
        )
    orphans = [t for t in tasks if not any(t in m for m in groups.values())]
    if orphans:
        raise ConfigError(
            f"model.groups: task(s) {', '.join(orphans)} of model {cfg.model.name} are in no "
            "gradient group and would never train; add them to a group or switch them off in "
            "model.tasks"
        )
    mode = cfg.trainer.surgery
    if mode in TWO_GROUP_SURGERY and len(groups) != 2:
        raise ConfigError(
            f"trainer.surgery={mode} needs exactly 2 gradient groups (main and aux); with model "
            f"{cfg.model.name} the groups are {sorted(groups)}: set trainer.surgery=none "
            "(or pcgrad), or enable auxiliary tasks"
        )
    return groups
