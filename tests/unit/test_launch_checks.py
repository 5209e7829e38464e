"""The driver's checks before any worker starts (``train.launch.validate_for_training``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def test_more_workers_than_train_shards_is_refused_with_the_shard_size_to_prepare(tiny_cfg):
    """Shards are dealt whole to ranks, so a worker past the shard count would train on
    padding only (it happened: 4 workers on a 2-shard folder). The error gives the
    ``data.impressions_per_shard`` that would give every worker a shard."""
    from mtrec_dist.config import ConfigError
    from mtrec_dist.train.launch import validate_for_training

    cfg = tiny_cfg()
    train = json.loads((Path(cfg.prepared_dir) / "manifest.json").read_text())["splits"]["train"]
    n, imps = len(train["shards"]), train["impressions"]
    assert n >= 2  # the tiny set has several shards: the boundary below is a real one

    manifest, _ = validate_for_training(tiny_cfg(f"trainer.num_workers={n}"))
    assert len(manifest["splits"]["train"]["shards"]) == n
    with pytest.raises(ConfigError) as e:
        validate_for_training(tiny_cfg(f"trainer.num_workers={n + 1}"))
    msg = str(e.value)
    assert f"{n} shard(s) for trainer.num_workers={n + 1}" in msg
    assert f"data.impressions_per_shard={math.ceil(imps / (n + 1))} or less" in msg
