"""Benchmark ``mtrec synth --scale large``: wall time and peak RSS of one full generation.

Target (brief): < 15 minutes and < 6 GB peak RSS on 2 cores. Writes bench/results/synth.json.

    python bench/bench_synth.py [--out DIR] [--scale large] [--seed 0] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from mtrec_dist.data.synthetic import generate
from mtrec_dist.utils import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="", help="dataset folder (default: a temp folder)")
    ap.add_argument("--scale", default="large")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the generated dataset")
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "synth.json"))
    args = ap.parse_args()

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mtrec-synth-"))
    t0 = time.monotonic()
    info = generate(out, scale=args.scale, seed=args.seed, progress=True)
    wall = time.monotonic() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    c = info["counts"]
    result = {
        "scale": args.scale,
        "seed": args.seed,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "target": {"wall_s": 900, "peak_rss_mb": 6144},
        "within_target": wall < 900 and peak_mb < 6144,
        "bytes_written": size,
        "impressions": {s: c[s]["impressions"] for s in ("train", "dev", "test")},
        "news": {s: c[s]["news"] for s in ("train", "dev", "test")},
        "impressions_per_s": round(
            sum(c[s]["impressions"] for s in ("train", "dev", "test")) / wall
        ),
        "ctr_train": c["train"]["ctr"],
        "ceiling": info["ceiling"],
    }
    atomic_write_json(args.result, result)
    print(json.dumps(result, indent=2))
    if not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
