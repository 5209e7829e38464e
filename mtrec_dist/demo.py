"""``make demo``: synthetic MIND (small) -> prepare -> short MTRec run -> dev metrics vs the ceiling.

Each stage is skipped when its output already exists and is complete (synth.json, manifest.json),
so a second ``make demo`` goes straight to training.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mtrec_dist import quality
from mtrec_dist.config import Config, load_config
from mtrec_dist.data.prepare import prepare
from mtrec_dist.data.synthetic import generate
from mtrec_dist.eval.evaluate import evaluate
from mtrec_dist.hub import load_encoder
from mtrec_dist.train.launch import run_training

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def run_demo(out: Path, config: str | None = None, overrides: list[str] | None = None) -> dict:
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
        print("      exists, reused")
    else:
        generate(data, scale="small", seed=0)

    print(f"[2/4] prepare -> {cfg.prepared_dir}", flush=True)
    if (cfg.prepared_dir / "manifest.json").is_file():
        print("      exists, reused")
    else:
        prepare(cfg)

    regime = describe_regime(cfg)
    print(
        f"[3/4] train {cfg.model.name} on {cfg.model.encoder} ({regime}) -> {cfg.run_dir}",
        flush=True,
    )
    run_training(cfg)

    print("[4/4] evaluate on the whole dev split", flush=True)
    metrics = evaluate(cfg.run_dir, split="dev", num_workers=1)
    ceilings = quality.ceilings(data, "dev")  # every dev impression, the evaluator's tie rule
    full, content = ceilings["full"], ceilings["content"]
    print()
    print(f"{'metric':<10}{'model':>10}{'content':>10}{'ceiling':>10}")
    for k in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        print(f"{k:<10}{metrics[k]:>10.4f}{content[k]:>10.4f}{full[k]:>10.4f}")
    lift_c = quality.lift_fraction(metrics["auc"], content["auc"])
    lift_f = quality.lift_fraction(metrics["auc"], full["auc"])
    print(
        f"{'lift':<10}{lift_c:>10.1%}{1.0:>10.1%}{'':>10}   of the content ceiling's lift, "
        "(AUC - 0.5) / (content AUC - 0.5)"
    )
    print(
        f"{'':<10}{lift_f:>10.1%}{quality.lift_fraction(content['auc'], full['auc']):>10.1%}"
        f"{1.0:>10.1%}   of the full ceiling's lift"
    )
    print(
        "\n(ceiling = the planted click model's true probabilities used as scores on dev; "
        "content = the same without its popularity term, the best a model that reads titles "
        "can do)"
    )
    print(f"regime: {regime}")
    print(
        f"wrote: data {data}, prepared {cfg.prepared_dir}, run {cfg.run_dir} "
        f"(export/, train_log.jsonl, eval/dev/metrics.json)"
    )
    print(f"demo finished in {time.monotonic() - t0:.0f} s")
    return {"metrics": metrics, "ceiling": full, "content_ceiling": content}


def describe_regime(cfg: Config) -> str:
    """One line naming what trains, e.g. 'top 1 of 6 MiniLM layers trained over cached lower
    layers, encoder lr 2e-05, lr 0.001, 100 steps of 32'."""
    n = cfg.model.encoder_layers or load_encoder(cfg.model.encoder).config.num_hidden_layers
    k = cfg.model.train_layers
    name = {"minilm": "MiniLM"}.get(cfg.model.encoder, cfg.model.encoder)
    what = (
        f"all {n} {name} layers trained"
        if k == 0
        else f"{name} frozen ({n} layers cached)"
        if k == -1
        else f"top {k} of {n} {name} layers trained over cached lower layers"
    )
    t = cfg.trainer
    batch = t.micro_batch * t.grad_accum * t.num_workers
    return (
        f"{what}, encoder lr {t.encoder_lr or t.lr:g}, lr {t.lr:g}, {t.max_steps} steps of {batch}"
    )
