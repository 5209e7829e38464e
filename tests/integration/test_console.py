"""The console of `mtrec train` shows our progress and results, not Ray's internals."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_train_console_is_ours(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.pop("MTREC_QUIET", None)  # the console is what this test reads
    env["HOME"] = str(tmp_path)  # no leftover Ray token files
    cmd = [
        sys.executable,
        "-m",
        "mtrec_dist.cli",
        "train",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        f"data.root={tiny_data}",
        f"run_dir={run_dir}",
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=0",
        "eval.max_impressions=20",
    ]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    console = p.stdout + p.stderr
    assert p.returncode == 0, console[-4000:]
    lines = console.splitlines()
    # our progress: one line per logged step, in order, and the final one
    steps = [int(m.group(1)) for m in map(re.compile(r"^train: (\d)/4 steps").match, lines) if m]
    assert steps[:4] == [1, 2, 3, 4], console
    # dev metrics of the untrained model (step 0), then at steps 2 and 4: the values logged
    dev = [json.loads(x) for x in (run_dir / "dev_log.jsonl").read_text().splitlines()]
    assert [d["step"] for d in dev] == [0, 2, 4]
    for d in dev:
        want = f"dev @ step {d['step']}: auc={d['auc']:.4f}, mrr={d['mrr']:.4f}"
        assert any(line.startswith(want) for line in lines), (want, console)
    # Ray's own logs are named once and stay in their folders
    ray_lines = [line for line in lines if line.startswith("ray logs: ")]
    assert len(ray_lines) == 1
    assert (run_dir / "logs" / "ray_driver.log").is_file()
    for noise in (
        "PlacementGroupCleaner",
        "(RayTrainWorker",
        "(TrainController",
        "Started a local Ray",
    ):
        assert noise not in console, noise
    assert len(lines) < 25, console
