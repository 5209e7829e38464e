"""Cost of checking a shard against its manifest entry while it is read (sha256 and count).

Writes one shard the way ``mtrec prepare`` does (default 20,000 impressions, MIND-like sizes:
50 history rows, 37 candidates, labels), then times reading it to the end with all checks, with
every check but the sha256, and ``sha256_file`` alone. Prints JSON.

    python bench/bench_shard_check.py [--impressions 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec_dist.data import stream  # noqa: E402
from mtrec_dist.data.prepared import CAND, HIST, LABEL, Shard  # noqa: E402
from mtrec_dist.data.shards import npy_bytes  # noqa: E402
from mtrec_dist.utils import sha256_file  # noqa: E402


def write_shard(path: Path, n: int, seed: int = 0) -> Shard:
    import webdataset as wds

    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for i in range(n):
            c = int(rng.integers(5, 70))
            lab = np.zeros(c, np.uint8)
            lab[rng.integers(c)] = 1
            w.write({
                "__key__": str(i),
                HIST: npy_bytes(rng.integers(1, 100_000, 50).astype("<i4")),
                CAND: npy_bytes(rng.integers(1, 100_000, c).astype("<i4")),
                LABEL: npy_bytes(lab),
            })  # fmt: skip
    return Shard(path, sha256_file(path), n, n)


def read_all(shard: Shard) -> int:
    return sum(1 for _ in stream._impressions(shard, True, 100_000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impressions", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        shard = write_shard(Path(d) / "s.tar", a.impressions)
        timing: dict[str, list[float]] = {"checked": [], "no_sha256": [], "sha256_file": []}
        for _ in range(a.repeat):
            t = time.perf_counter()
            assert read_all(shard) == a.impressions
            timing["checked"].append(time.perf_counter() - t)
            real = stream.sha256_file
            stream.sha256_file = lambda _: ""
            try:
                t = time.perf_counter()
                read_all(Shard(shard.path, "", shard.impressions, shard.clicks))
                timing["no_sha256"].append(time.perf_counter() - t)
            finally:
                stream.sha256_file = real
            t = time.perf_counter()
            sha256_file(shard.path)
            timing["sha256_file"].append(time.perf_counter() - t)
        best = {k: min(v) for k, v in timing.items()}
        print(json.dumps({
            "impressions": a.impressions,
            "shard_mb": round(shard.path.stat().st_size / 2**20, 1),
            **{f"{k}_s": round(v, 3) for k, v in best.items()},
            "sha256_share_of_read": round(1 - best["no_sha256"] / best["checked"], 3),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
