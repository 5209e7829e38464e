"""Data-parallel efficiency on one machine: 2 workers x 1 thread vs 1 worker x 2 threads, ZeRO-2.

Three runs of MTRec (surgery on, MiniLM) on the synthetic ``--scale`` data, same steps, run
one after the other in this process's Ray instance:

* ``one``: 1 worker x 2 threads, micro batch ``--micro``;
* ``two_same_micro``: 2 workers x 1 thread, micro batch ``--micro`` each (global batch 2x):
  the usual data-parallel comparison, each worker does the one-worker run's work per step;
* ``two_same_global``: 2 workers x 1 thread, micro batch ``--micro``/2 each (same global batch).

samples/s and titles/s are the means of the train log's throughput over the steps after
warm-up. The titles encoded per sample depend on the micro batch (titles shared by a batch's
samples are encoded once), so at the same global batch half-size micro batches encode more
titles per sample: the titles/s ratio separates that from parallel efficiency. Target (issue
4): samples/s ratio >= 0.85.

    python bench/bench_scaling.py [--scale small] [--steps 20] [--warmup 3] [--micro 16] \
        [--out bench/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(root: Path, run_dir: Path, ds: Path, workers: int, threads: int, micro: int, a):
    from mtrec_dist.config import load_config
    from mtrec_dist.train.launch import run_training

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.root={root}",
            f"run_dir={run_dir}",
            f"model.encoder={a.encoder}",
            f"deepspeed={ds}",
            f"trainer.num_workers={workers}",
            f"trainer.cpus_per_worker={threads}",
            f"trainer.micro_batch={micro}",
            f"trainer.max_steps={a.steps}",
            "trainer.checkpoint_every=0",
            "trainer.lr=2e-5",
            "data.history_len=20",
            "data.loader_workers=0",
        ],
    )
    print(
        f"[bench_scaling] {workers} worker(s) x {threads} thread(s), micro batch {micro}",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.monotonic()
    run_training(cfg)
    wall = time.monotonic() - t0
    recs = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    tail = [r for r in recs if r["step"] > a.warmup]
    sps = statistics.mean(r["throughput/samples_per_s"] for r in tail)
    tps = statistics.mean(r["throughput/titles_per_s"] for r in tail)
    return {
        "workers": workers,
        "threads_per_worker": threads,
        "micro_batch": micro,
        "global_batch": micro * workers,
        "samples_per_s": round(sps, 3),
        "titles_per_s": round(tps, 2),
        "titles_per_sample": round(tps / sps, 2),
        "step_s_median": round(
            statistics.median(micro * workers / r["throughput/samples_per_s"] for r in tail), 3
        ),
        "surgery_s_mean": round(statistics.mean(r.get("surgery/time_s", 0.0) for r in tail), 4),
        "peak_mb_rank0": max(r.get("mem/peak_mb", 0.0) for r in recs),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--scale", default="small", help="synthetic data scale (tiny|small)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro", type=int, default=16, help="micro batch of the one-worker run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scaling.json"))
    a = ap.parse_args()

    import ray

    from mtrec_dist.config import load_config
    from mtrec_dist.data.shards import prepare
    from mtrec_dist.data.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "data"
        generate(root, scale=a.scale, seed=0, progress=False)
        prepare(
            load_config(
                REPO / "configs" / "tiny.yaml", [f"data.root={root}", f"model.encoder={a.encoder}"]
            ),
            progress=False,
        )
        ds = tmp / "zero2.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            one = measure(root, tmp / "one", ds, 1, 2, a.micro, a)
            same_micro = measure(root, tmp / "two_m", ds, 2, 1, a.micro, a)
            same_global = measure(root, tmp / "two_g", ds, 2, 1, a.micro // 2, a)
        finally:
            ray.shutdown()
    out = {
        "benchmark": "scaling: 2 workers x 1 thread vs 1 worker x 2 threads, ZeRO-2, MTRec",
        "encoder": a.encoder,
        "data": f"synthetic {a.scale}",
        "steps": a.steps,
        "warmup_steps": a.warmup,
        "one_worker_two_threads": one,
        "two_workers_same_micro_batch": same_micro,
        "two_workers_same_global_batch": same_global,
        "ratio_samples_per_s_same_micro_batch": round(
            same_micro["samples_per_s"] / one["samples_per_s"], 3
        ),
        "ratio_samples_per_s_same_global_batch": round(
            same_global["samples_per_s"] / one["samples_per_s"], 3
        ),
        "ratio_titles_per_s_same_global_batch": round(
            same_global["titles_per_s"] / one["titles_per_s"], 3
        ),
        "target_ratio": 0.85,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
