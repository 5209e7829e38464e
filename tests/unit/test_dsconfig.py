"""DeepSpeed JSON validation happens on the driver, before any worker starts."""

import json
from pathlib import Path

import pytest

from mtrec_dist.config import ConfigError, load_config
from mtrec_dist.train.dsconfig import describe, resolve_deepspeed

DS_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


@pytest.mark.parametrize("path", sorted(DS_DIR.glob("*.json")), ids=lambda p: p.name)
def test_shipped_jsons_resolve(path):
    cfg = load_config(
        None,
        [
            f"deepspeed={path}",
            "trainer.micro_batch=8",
            "trainer.grad_accum=3",
            "trainer.surgery=none",  # the offload config needs it; the others do not care
            "trainer.num_workers=4",
        ],
    )
    ds = resolve_deepspeed(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert '"auto"' not in json.dumps(ds)
    assert describe(ds).endswith("global batch 96 = 8 micro x 3 accumulation x 4 workers")


def _write(tmp_path, obj):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(obj))
    return p


def test_gradient_clipping_is_owned_by_the_yaml(tmp_path):
    # DeepSpeed's own default is 1.0; ours is the papers' "no clipping", always written out
    assert resolve_deepspeed(load_config(None, []))["gradient_clipping"] == 0.0
    assert (
        resolve_deepspeed(load_config(None, ["trainer.grad_clip=1.5"]))["gradient_clipping"] == 1.5
    )
    p = _write(tmp_path, {"gradient_clipping": 1.0})
    with pytest.raises(
        ConfigError, match=r"gradient_clipping=1.0 contradicts trainer.grad_clip = 0.0"
    ):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}"]))


def test_default_is_zero1_fp32():
    ds = resolve_deepspeed(load_config(None, ["trainer.micro_batch=4"]))
    assert ds["zero_optimization"] == {"stage": 1} and ds["train_batch_size"] == 4
    assert "bf16" not in ds and "fp16" not in ds


def test_contradiction_names_both_keys(tmp_path):
    p = _write(tmp_path, {"train_micro_batch_size_per_gpu": 16})
    with pytest.raises(
        ConfigError, match=r"train_micro_batch_size_per_gpu=16 contradicts trainer.micro_batch = 32"
    ):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}"]))
    p = _write(tmp_path, {"train_batch_size": 64})
    with pytest.raises(
        ConfigError,
        match=r"train_batch_size=64 contradicts trainer.micro_batch x trainer.grad_accum x trainer.num_workers = 96",
    ):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}", "trainer.num_workers=3"]))
    # an explicit value that agrees is accepted
    p = _write(tmp_path, {"train_batch_size": 96})
    assert (
        resolve_deepspeed(load_config(None, [f"deepspeed={p}", "trainer.num_workers=3"]))[
            "train_batch_size"
        ]
        == 96
    )


def test_keys_owned_by_yaml_and_typos(tmp_path):
    p = _write(tmp_path, {"optimizer": {"type": "AdamW"}})
    with pytest.raises(
        ConfigError, match="key 'optimizer' is owned by the YAML config: set trainer.lr"
    ):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}"]))
    p = _write(tmp_path, {"zero_optimisation": {"stage": 2}})
    with pytest.raises(ConfigError, match="unknown key 'zero_optimisation'"):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}"]))
    p = _write(tmp_path, {"zero_optimization": {"stage": 2, "overlap_com": True}})
    with pytest.raises(ConfigError, match="zero_optimization: .*overlap_com"):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}"]))
    p = _write(tmp_path, {"zero_optimization": {"stage": 4}})
    with pytest.raises(ConfigError, match="stage must be 0, 1, 2 or 3"):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}"]))
    p = _write(tmp_path, {"bf16": {"enabled": True}, "fp16": {"enabled": True}})
    with pytest.raises(ConfigError, match="pick one"):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}"]))
    p = _write(tmp_path, {"steps_per_print": "auto"})
    with pytest.raises(ConfigError, match="no value for 'auto' at steps_per_print"):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}"]))


def test_bad_json_names_line(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(ConfigError, match=r"ds.json:3: not valid JSON"):
        resolve_deepspeed(load_config(None, [f"deepspeed={p}"]))
    with pytest.raises(ConfigError, match="no such file"):
        resolve_deepspeed(load_config(None, ["deepspeed=/nonexistent.json"]))


def test_offload_keeps_our_adamw():
    """With offload, DeepSpeed would demand its own CPU Adam; our AdamW (trainer.*) is kept."""
    off = DS_DIR / "zero3_offload_bf16.json"
    ds = resolve_deepspeed(load_config(None, [f"deepspeed={off}", "trainer.surgery=none"]))
    assert ds["zero_force_ds_cpu_optimizer"] is False
    no_off = resolve_deepspeed(load_config(None, [f"deepspeed={DS_DIR / 'zero2_bf16.json'}"]))
    assert "zero_force_ds_cpu_optimizer" not in no_off


@pytest.mark.parametrize(
    "obj,expect",
    [
        ({"bf16": True}, "key 'bf16' = true; expected a JSON object"),
        ({"fp16": 1}, "key 'fp16' = 1; expected a JSON object"),
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": None}},
            "key 'zero_optimization.offload_optimizer' = null; expected a JSON object",
        ),
        ({"zero_optimization": 2}, "key 'zero_optimization' = 2; expected a JSON object"),
    ],
)
def test_bare_values_for_sections_name_file_and_key(tmp_path, obj, expect):
    p = _write(tmp_path, obj)
    cfg = load_config(None, [f"deepspeed={p}", "trainer.surgery=none"])
    with pytest.raises(ConfigError) as e:
        resolve_deepspeed(cfg)
    assert str(e.value).startswith(f"{p}: {expect}")
