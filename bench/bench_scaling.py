"""Data-parallel efficiency on one machine: 2 workers x 1 thread vs 1 worker x 2 threads, ZeRO-2.

Both runs train MTRec (surgery on) for the same number of steps at the same global batch;
samples/s is the mean of the train log's throughput over the steps after warm-up. Target
(issue 4): ratio >= 0.85.

    python bench/bench_scaling.py [--encoder minilm] [--steps 8] [--warmup 2] \
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


def measure(root: Path, run_dir: Path, ds: Path, workers: int, threads: int, a) -> dict:
    from mtrec_dist.config import load_config
    from mtrec_dist.train.launch import run_training

    micro = a.global_batch // workers
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
    t0 = time.monotonic()
    run_training(cfg)
    wall = time.monotonic() - t0
    recs = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    tail = [r for r in recs if r["step"] > a.warmup]
    return {
        "workers": workers,
        "threads_per_worker": threads,
        "micro_batch": micro,
        "global_batch": a.global_batch,
        "samples_per_s": statistics.mean(r["throughput/samples_per_s"] for r in tail),
        "titles_per_s": statistics.mean(r["throughput/titles_per_s"] for r in tail),
        "peak_mb_rank0": max(r.get("mem/peak_mb", 0.0) for r in recs),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scaling.json"))
    a = ap.parse_args()

    import ray

    from mtrec_dist.config import load_config
    from mtrec_dist.data.shards import prepare
    from mtrec_dist.data.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "data"
        generate(root, scale="tiny", seed=0, progress=False)
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
            one = measure(root, tmp / "one", ds, 1, 2, a)
            two = measure(root, tmp / "two", ds, 2, 1, a)
        finally:
            ray.shutdown()
    out = {
        "benchmark": "scaling: 2 workers x 1 thread vs 1 worker x 2 threads, ZeRO-2, MTRec",
        "encoder": a.encoder,
        "steps": a.steps,
        "warmup_steps": a.warmup,
        "one_worker_two_threads": one,
        "two_workers_one_thread": two,
        "ratio_samples_per_s": two["samples_per_s"] / one["samples_per_s"],
        "target_ratio": 0.85,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
