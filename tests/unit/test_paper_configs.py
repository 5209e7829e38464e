"""configs/paper/: one YAML per table row of the four papers.

Each file is checked against the papers' settings written down HERE (not read from the files):
encoder, global batch, epochs, learning rate, lengths, lambda and the ablation's groups and
surgery; its DeepSpeed JSON resolves at the paper's batch; then it trains 2 steps with the tiny
encoder on tiny data through the single-process reference trainer, and the task losses it logs
are the row's tasks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from mtrec_dist.config import load_config

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "configs" / "paper"
CONFIGS = sorted(PAPER.glob("*.yaml"))
BERT = "bert-base-uncased"
GLOVE_DIM = 16  # the test's GloVe file (the configs name 300-d glove.840B)

# (encoder folder name, global batch, epochs, lr) per paper, from the papers' settings sections
SETTINGS = {
    "mtrec": (BERT, 128, 3, 2e-5),  # Appendix A (batch/epochs not given: our choice, stated)
    "miner": (BERT, 128, 5, 2e-5),  # MINER §4.1
    "unbert": (BERT, 128, 2, 2e-5),  # UNBERT §4.3
    "classic": (BERT, 32, 5, 1e-4),  # newsrec's settings; the encoder gives the tokenizer only
    "ebnerd": ("bert-base-multilingual-cased", 128, 3, None),  # poster: multilingual BERT
}
MAIN_AUX = {"main": {"main": 1.0}, "aux": {"category": 0.3, "ner": 0.3}}
MAIN = {"main": {"main": 1.0}}
# config -> (task losses its model computes, gradient groups, surgery)
ROWS = {
    "mtrec_t1_bert": ({"main"}, MAIN, "none"),
    "mtrec_t1_lstur_bert": ({"main"}, MAIN, "none"),
    "mtrec_t1_nrms_bert": ({"main"}, MAIN, "none"),
    "mtrec_t1_bert_amf": ({"main"}, MAIN, "none"),
    "mtrec_t1_mtrec": ({"main", "category", "ner"}, MAIN_AUX, "mtrec"),
    "mtrec_t1_mtrec_amf": ({"main", "category", "ner"}, MAIN_AUX, "mtrec"),
    "mtrec_f4_wo_category": ({"main", "ner"}, {**MAIN, "aux": {"ner": 0.3}}, "mtrec"),
    "mtrec_f4_wo_ner": ({"main", "category"}, {**MAIN, "aux": {"category": 0.3}}, "mtrec"),
    # eq. 9: every task weight 1 in one group, no surgery
    "mtrec_f4_wo_gs": (
        {"main", "category", "ner"},
        {"main": {"main": 1.0, "category": 1.0, "ner": 1.0}},
        "none",
    ),
    # Yu et al.'s PCGrad over the three task gradients, treated equally
    "mtrec_f4_original_gs": (
        {"main", "category", "ner"},
        {"main": {"main": 1.0}, "category": {"category": 1.0}, "ner": {"ner": 1.0}},
        "pcgrad",
    ),
    "mtrec_aux_only": ({"main", "category", "ner"}, MAIN_AUX, "aux_only"),
    "classic_nrms": ({"main"}, MAIN_AUX, "none"),  # default groups; aux is dropped at build
    "classic_naml": ({"main"}, MAIN_AUX, "none"),
    "classic_lstur": ({"main"}, MAIN_AUX, "none"),
    "classic_lstur_con": ({"main"}, MAIN_AUX, "none"),
    "classic_npa": ({"main"}, MAIN_AUX, "none"),
    "miner_t2_max": (
        {"main", "disagreement"},
        {"main": {"main": 1.0, "disagreement": 0.8}},
        "none",
    ),
    "miner_t2_mean": (
        {"main", "disagreement"},
        {"main": {"main": 1.0, "disagreement": 0.8}},
        "none",
    ),
    "miner_t2_weighted": (
        {"main", "disagreement"},
        {"main": {"main": 1.0, "disagreement": 0.8}},
        "none",
    ),
    "miner_t3_wo_disagreement": ({"main"}, MAIN, "none"),
    "miner_t3_wo_category": (
        {"main", "disagreement"},
        {"main": {"main": 1.0, "disagreement": 0.8}},
        "none",
    ),
    "unbert_t2": ({"main"}, MAIN, "none"),
    "unbert_t3_word": ({"main"}, MAIN, "none"),
    "unbert_t3_news": ({"main"}, MAIN, "none"),
    "unbert_t4_nseg": ({"main"}, MAIN, "none"),
    "unbert_t4_mean": ({"main"}, MAIN, "none"),
    "ebnerd_t1_bert": ({"main"}, MAIN, "none"),
    "ebnerd_t1_mtrec_og": ({"main", "category", "ner"}, MAIN_AUX, "mtrec"),
    "ebnerd_t1_mtrec_ours": (
        {"main", "category", "sentiment"},
        {**MAIN, "aux": {"category": 0.3, "sentiment": 0.3}},
        "mtrec",
    ),
    "ebnerd_t1_wo_lora": (
        {"main", "category", "sentiment"},
        {**MAIN, "aux": {"category": 0.3, "sentiment": 0.3}},
        "mtrec",
    ),
    "ebnerd_t1_wo_cat": ({"main", "sentiment"}, {**MAIN, "aux": {"sentiment": 0.3}}, "mtrec"),
    "ebnerd_t1_wo_sent": ({"main", "category"}, {**MAIN, "aux": {"category": 0.3}}, "mtrec"),
}
# model switches each row is about
SWITCHES = {
    "mtrec_t1_lstur_bert": {"name": "lstur_bert"},
    "mtrec_t1_nrms_bert": {"name": "nrms_bert"},
    "mtrec_t1_bert_amf": {"name": "bert_amf", "amf_dim": 100},
    "mtrec_t1_mtrec_amf": {"name": "mtrec_amf", "amf_dim": 100},
    "classic_lstur": {"name": "lstur", "lstur_kind": "ini"},
    "classic_lstur_con": {"name": "lstur", "lstur_kind": "con"},
    "miner_t2_max": {"miner_aggregator": "max", "miner_k": 32},
    "miner_t2_mean": {"miner_aggregator": "mean"},
    "miner_t2_weighted": {"miner_aggregator": "weighted", "miner_category_bias": True},
    "miner_t3_wo_category": {"miner_aggregator": "weighted", "miner_category_bias": False},
    "unbert_t2": {"unbert_aggregator": "attention", "unbert_signals": "both"},
    "unbert_t3_word": {"unbert_signals": "word"},
    "unbert_t3_news": {"unbert_signals": "news"},
    "unbert_t4_nseg": {"unbert_aggregator": "nsep"},
    "unbert_t4_mean": {"unbert_aggregator": "mean"},
    "ebnerd_t1_mtrec_ours": {"lora": True},
    "ebnerd_t1_wo_lora": {"lora": False},
    "ebnerd_t1_wo_cat": {"lora": True},
}


def _paper(stem: str) -> str:
    return stem.split("_")[0]


def test_every_row_has_a_config():
    assert sorted(p.stem for p in CONFIGS) == sorted(ROWS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_has_the_papers_settings(path):
    text = path.read_text()
    assert re.match(r"# paper", text), "first line names the paper"
    assert re.search(r"(Table|Figure) \d", text) or "not a paper row" in text or "LSTUR-con" in text
    assert re.search(r"row", text)
    cfg = load_config(path)
    enc, batch, epochs, lr = SETTINGS[_paper(path.stem)]
    t = cfg.trainer
    assert Path(cfg.model.encoder).name == enc
    assert t.micro_batch * t.grad_accum * t.num_workers == batch
    m = re.search(r"Global batch = (\d+) micro x (\d+) accumulation x (\d+) workers? = (\d+)", text)
    assert m and tuple(map(int, m.groups())) == (t.micro_batch, t.grad_accum, t.num_workers, batch)
    assert t.epochs == epochs
    if lr is not None:
        assert t.lr == lr
    else:  # the poster: LoRA at 1e-4, full fine-tuning at MTRec's 2e-5
        assert t.lr == (1e-4 if cfg.model.lora else 2e-5)
    assert (cfg.data.history_len, cfg.data.neg_k, cfg.model.query_dim) == (50, 4, 200)
    assert cfg.data.title_len == (32 if _paper(path.stem) == "classic" else 20)
    tasks, groups, surgery = ROWS[path.stem]
    assert (cfg.model.groups, t.surgery) == (groups, surgery)
    on = {k for k, v in cfg.model.tasks.items() if v} | {"main"}
    if _paper(path.stem) in ("mtrec", "ebnerd") and "bert" not in path.stem.split("_")[-1]:
        assert on == tasks
    for key, value in SWITCHES.get(path.stem, {}).items():
        assert getattr(cfg.model, key) == value, key
    if _paper(path.stem) == "ebnerd":
        assert cfg.data.format == "ebnerd"
    if "ner" in tasks:  # MTRec eq. 8 sums a title's token CEs; the default (mean) does not
        assert re.search(r"^  ner_reduction: sum +# eq\. 8", text, re.M), "pin ner_reduction"
        assert cfg.model.ner_reduction == "sum"
    if _paper(path.stem) == "classic":
        assert cfg.model.word_dim == 300 and cfg.data.word_vectors.endswith("300d.txt")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_deepspeed_json_resolves_at_the_papers_batch(path):
    from mtrec_dist.train.dsconfig import resolve_deepspeed

    cfg = load_config(path)
    cfg.deepspeed = str(REPO / cfg.deepspeed)
    ds = resolve_deepspeed(cfg)
    t = cfg.trainer
    assert ds["train_batch_size"] == t.micro_batch * t.grad_accum * t.num_workers
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["stage"] == 2


@pytest.fixture(scope="module")
def ebnerd_data(tmp_path_factory) -> Path:
    """A tiny EBNeRD folder (articles with sentiment and NER clusters, train + validation)."""
    from mtrec_dist.data.prepare import prepare
    from tests.unit.test_ebnerd_reader import _articles, _split

    root = tmp_path_factory.mktemp("ebnerd") / "data"
    root.mkdir()
    _articles(root)
    _split(root / "train", with_clicks=True)
    _split(root / "validation", with_clicks=True)
    cfg = load_config(
        PAPER / "ebnerd_t1_mtrec_ours.yaml",
        [f"data.root={root}", "model.encoder=tiny", "data.loader_workers=0"],
    )
    prepare(cfg, progress=False)
    return root


@pytest.fixture(scope="module")
def glove(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("glove") / "glove.txt"
    rows = (f"{w} " + " ".join(["0.5"] * GLOVE_DIM) + "\n" for w in ("the", "news", "in"))
    p.write_text("".join(rows))
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_two_steps_with_the_tiny_encoder(
    path, tiny_data, ebnerd_data, glove, tmp_path
):
    from mtrec_dist.train.local import train_local

    root = ebnerd_data if _paper(path.stem) == "ebnerd" else tiny_data
    overrides = [
        "model.encoder=tiny",  # nothing downloads: the paper's encoder is swapped for tiny BERT
        f"data.root={root}",
        f"data.prepared={root / 'prepared'}",
        f"run_dir={tmp_path / 'run'}",
        "trainer.use_gpu=false",
        "trainer.num_workers=1",
        "trainer.micro_batch=4",
        "trainer.grad_accum=1",
        "trainer.epochs=2",
        "trainer.max_steps=2",
        "trainer.log_every=0",
        "data.loader_workers=0",
        "data.history_len=5",
    ]
    if cfg_word_vectors(path):  # the classic models: a GloVe file by path, small widths
        overrides += [f"data.word_vectors={glove}", f"model.word_dim={GLOVE_DIM}"]
        overrides += ["model.cnn_filters=8", "model.nrms_heads=2", "model.nrms_head_dim=4"]
    cfg = load_config(path, overrides)
    train_local(cfg, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    tasks, groups, _ = ROWS[path.stem]
    for r in recs:
        logged = {k.split("/", 1)[1] for k in r if k.startswith("loss/")}
        assert logged == tasks
        assert all(math.isfinite(r[f"loss/{k}"]) for k in tasks)
        coefs = {k.rsplit("/", 1)[1] for k in r if k.startswith(coef_key(""))}
        assert coefs == {g for g, m in groups.items() if set(m) & tasks}


def coef_key(group: str) -> str:
    from mtrec_dist.train.surgery import coef_key as key

    return key(group)


def cfg_word_vectors(path: Path) -> bool:
    return bool(yaml.safe_load(path.read_text()).get("data", {}).get("word_vectors"))
