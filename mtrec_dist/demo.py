"""``make demo``: synthetic MIND (small) -> prepare -> short MTRec run -> dev metrics vs the ceiling.

Each stage is skipped when its output already exists and is complete (synth.json, manifest.json),
so a second ``make demo`` goes straight to training.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mtrec_dist.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def run_demo(out: Path, config: str | None = None, overrides: list[str] | None = None) -> dict:
    from mtrec_dist.data.shards import prepare
    from mtrec_dist.data.synthetic import generate
    from mtrec_dist.eval.evaluate import evaluate
    from mtrec_dist.eval.quality import lift_fraction
    from mtrec_dist.train.launch import run_training

    t0 = time.monotonic()
    out = Path(out)
    # One Ray worker, given every core of this machine (torch runs one thread per reserved CPU).
    base = [
        f"data.root={out / 'data'}",
        f"run_dir={out / 'run'}",
        f"trainer.cpus_per_worker={os.cpu_count() or 1}",
    ]
    cfg = load_config(config or DEMO_CONFIG, base + list(overrides or []))
    data = Path(cfg.data.root)

    print(f"[1/4] synthetic MIND (small) -> {data}", flush=True)
    if (data / "synth.json").is_file():
        synth = json.loads((data / "synth.json").read_text())
        print("      exists, reused")
    else:
        synth = generate(data, scale="small", seed=0)

    print(f"[2/4] prepare -> {cfg.prepared_dir}", flush=True)
    if (cfg.prepared_dir / "manifest.json").is_file():
        print("      exists, reused")
    else:
        prepare(cfg)

    print(f"[3/4] train {cfg.model.name} on {cfg.model.encoder} -> {cfg.run_dir}", flush=True)
    run_training(cfg)

    print("[4/4] evaluate on dev", flush=True)
    metrics = evaluate(cfg.run_dir, split="dev", num_workers=1)
    ceiling = synth.get("ceiling", {}).get("dev", {})
    print()
    print(f"{'metric':<10}{'model':>10}{'ceiling':>10}")
    for k in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        m, c = metrics.get(k), ceiling.get(k)
        print(f"{k:<10}{m:>10.4f}{c if c is None else format(c, '10.4f'):>10}")
    if ceiling.get("auc"):
        lift = lift_fraction(metrics["auc"], ceiling["auc"])
        print(f"{'lift':<10}{lift:>10.1%}{1.0:>10.1%}   (AUC - 0.5) / (ceiling AUC - 0.5)")
    print("\n(ceiling = the planted click model's true probabilities used as scores on dev)")
    print(
        f"wrote: data {data}, prepared {cfg.prepared_dir}, run {cfg.run_dir} "
        f"(export/, train_log.jsonl, eval/dev/metrics.json)"
    )
    print(f"demo finished in {time.monotonic() - t0:.0f} s")
    return {"metrics": metrics, "ceiling": ceiling}
