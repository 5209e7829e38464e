"""Config: every shipped YAML loads; unknown keys and wrong types name the key, file and line."""

from pathlib import Path

import pytest
import yaml

from mtrec_dist.config import Config, ConfigError, dump_config, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # every value written in the file is what the config object holds
    for section, values in raw.items():
        if isinstance(values, dict):
            for k, v in values.items():
                got = getattr(getattr(cfg, section), k)
                if isinstance(v, dict):
                    for kk, vv in v.items():
                        assert got[kk] == vv, (path, section, k, kk)
                else:
                    assert got == v, (path, section, k)
        else:
            assert getattr(cfg, section) == values


def test_defaults_match_the_papers():
    cfg = Config()
    assert (cfg.data.title_len, cfg.data.history_len, cfg.data.neg_k) == (20, 50, 4)
    assert cfg.model.query_dim == 200
    assert cfg.model.groups == {"main": {"main": 1.0}, "aux": {"category": 0.3, "ner": 0.3}}
    assert (cfg.trainer.lr, cfg.trainer.warmup_ratio) == (2e-5, 0.1)


def test_unknown_key_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  title_len: 20\n  histroy_len: 50\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:3:" in msg and "data.histroy_len" in msg and "history_len" in msg


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer:\n  micro_batch: lots\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml:2: trainer.micro_batch: expected an integer, got 'lots'"
    ):
        load_config(p)
    with pytest.raises(ConfigError, match="trainer.use_gpu: expected true or false"):
        load_config(None, ["trainer.use_gpu=1"])
    with pytest.raises(ConfigError, match=r"model.groups.aux.ner: expected a number"):
        load_config(None, ["model.groups.aux.ner=high"])


def test_overrides_parse_and_merge():
    assert parse_override("trainer.lr=3e-5") == ("trainer.lr", 3e-5)
    assert parse_override("data.splits=[train,dev]") == ("data.splits", ["train", "dev"])
    cfg = load_config(
        None, ["trainer.lr=3e-5", "model.groups.aux.ner=0.5", "trainer.num_workers=4"]
    )
    assert cfg.trainer.lr == 3e-5 and cfg.trainer.num_workers == 4
    # nested mapping override keeps the sibling keys
    assert cfg.model.groups == {"main": {"main": 1.0}, "aux": {"category": 0.3, "ner": 0.5}}
    # int accepted where a float is expected
    assert load_config(None, ["trainer.lr=1"]).trainer.lr == 1.0


def test_override_errors():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["trainer.lr"])
    with pytest.raises(ConfigError, match="unknown key 'trainer.lrr'"):
        load_config(None, ["trainer.lrr=1"])
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config(None, ["nope=1"])


def test_choices_and_ranges():
    with pytest.raises(
        ConfigError,
        match="trainer.surgery='gradnorm': allowed values are none, mtrec, pcgrad, aux_only",
    ):
        load_config(None, ["trainer.surgery=gradnorm"])
    with pytest.raises(ConfigError, match="trainer.micro_batch=0: must be a positive integer"):
        load_config(None, ["trainer.micro_batch=0"])
    with pytest.raises(
        ConfigError, match="model.ner_reduction='max': allowed values are sum, mean"
    ):
        load_config(None, ["model.ner_reduction=max"])
    with pytest.raises(ConfigError, match="data.splits: unknown split 'val'"):
        load_config(None, ["data.splits=[train,val]"])


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["trainer.lr=3e-5", "model.name=miner", "data.splits=[train]"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_yaml_mapping_replaces_default_override_merges(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  groups: {main: {main: 1.0}, aux: {category: 0.3, sentiment: 0.3}}\n")
    cfg = load_config(p, ["model.groups.aux.category=0.5"])
    assert cfg.model.groups == {"main": {"main": 1.0}, "aux": {"category": 0.5, "sentiment": 0.3}}


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("max_failures", -1, "must be 0 or more"),
        ("timeout_s", -5, "must be a positive integer"),
        ("seed", -2, "must be 0 or more"),
        ("cpus_per_worker", 0, "must be a positive integer"),
        ("encoder_lr", -0.0001, "expected a learning rate >= 0 (0 = trainer.lr)"),
    ],
)
def test_out_of_range_trainer_values_name_key_and_file_line(tmp_path, key, value, expect):
    p = tmp_path / "c.yaml"
    p.write_text(f"model:\n  encoder: tiny\ntrainer:\n  lr: 0.001\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}:5: trainer.{key}={value}: {expect}"


def test_negative_loader_workers_named_with_file_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  loader_workers: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}:2: data.loader_workers=-1: must be 0 or more"


def test_out_of_range_override_names_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trainer.max_failures=-3"])
    assert str(e.value) == (
        "override 'trainer.max_failures=-3': trainer.max_failures=-3: must be 0 or more"
    )


def test_duplicate_yaml_key_is_refused_with_both_lines(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  lr: 0.001\n  epochs: 2\n  lr: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (
        f"{p}:4: duplicate key 'lr' (first given on line 2); give each key once"
    )
    p.write_text("trainer:\n  lr: 0.001\ntrainer:\n  epochs: 2\n")
    with pytest.raises(
        ConfigError, match=rf"{p}:3: duplicate key 'trainer' \(first given on line 1\)"
    ):
        load_config(p)


@pytest.mark.parametrize(
    "override,expect",
    [
        ("trainer.lr=-1", "trainer.lr=-1.0: expected a learning rate > 0"),
        ("trainer.lr=.nan", "trainer.lr=nan: expected a learning rate > 0"),
        ("trainer.weight_decay=-0.1", "trainer.weight_decay=-0.1: expected a weight decay >= 0"),
        ("trainer.adam_eps=0", "trainer.adam_eps=0.0: expected an AdamW epsilon > 0"),
        ("trainer.grad_clip=.inf", "trainer.grad_clip=inf: expected a gradient norm >= 0 (0 = "
         "no clipping)"),
        ("model.dropout=1.5", "model.dropout=1.5: expected -1 (the checkpoint's) or 0 <= p < 1"),
        ("model.lstur_mask_prob=2", "model.lstur_mask_prob=2.0: expected 0 <= p <= 1"),
        ("model.query_dim=0", "model.query_dim=0: must be a positive integer"),
        ("model.groups.aux.ner=-0.3", "model.groups.aux.ner=-0.3: expected a task weight >= 0"),
    ],
)  # fmt: skip
def test_every_numeric_setting_is_range_checked_at_load(override, expect):
    """Values the loader used to accept and a worker refused ~50 s later (issue 24)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == f"override '{override}': {expect}"


def test_float_range_error_names_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  epochs: 2\n  lr: -1.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}:3: trainer.lr=-0.001: expected a learning rate > 0"


def test_train_layers_takes_minus_one_and_nothing_below():
    """-1 (whole encoder frozen) is a value, not a negative size; -2 names the allowed ones."""
    assert load_config(None, ["model.train_layers=-1"]).model.train_layers == -1
    with pytest.raises(ConfigError, match=r"model.train_layers=-2: expected 0 \(all layers\)"):
        load_config(None, ["model.train_layers=-2"])
