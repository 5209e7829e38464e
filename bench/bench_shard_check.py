"""Cost of reading one shard with every check, against its parts (tar, sha256), per impression.

    python bench/bench_shard_check.py [--impressions 20000] [--repeat 3]

Writes one shard with the project's writer (``data/shardfile.py``), MIND-large-shaped
impressions (``mtrec synth --scale large`` statistics: history 0-50 rows, mean ~25; 5-45
candidates, mean 25; one click), then times, each the best of ``--repeat``, in CPU seconds of
this process (``time.process_time``) and wall seconds:

* ``checked``: ``read_impressions`` to the end: tar read, end-of-archive marker, every group
  decoded, rows / labels / users range-checked, count and sha256 (hashed while reading);
* ``tar_only``: the standard library's ``tarfile`` in stream mode, every member's bytes read
  (what webdataset's own reader does), nothing decoded or hashed;
* ``sha256_file``: hashing the file alone.

Divides by the shard's impressions (``*_us_per_impression``). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec_dist.data.prepared import Shard  # noqa: E402
from mtrec_dist.data.shardfile import ShardWriter, read_impressions  # noqa: E402
from mtrec_dist.utils import sha256_file  # noqa: E402

N_NEWS = 161_001  # MIND-large's news table (rows incl. <pad>)


def write_shard(root: Path, n: int, seed: int = 0) -> Shard:
    rng = np.random.default_rng(seed)
    with ShardWriter(root, "train", n) as w:
        for i in range(n):
            c = int(rng.integers(5, 46))
            lab = [0] * c
            lab[int(rng.integers(c))] = 1
            hist = rng.integers(1, N_NEWS, int(rng.integers(0, 51))).tolist()
            w.write(str(i), hist, rng.integers(1, N_NEWS, c).tolist(), lab, 0)
    (e,) = w.entries
    return Shard(root / e["path"], e["sha256"], e["impressions"], e["clicks"])


def _tar_only(path: Path) -> int:
    n = 0
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            n += len(tf.extractfile(m).read())
            tf.members = []
    return n


def _best(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds), each the minimum over ``repeat`` runs."""
    cpu, wall = [], []
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return min(cpu), min(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impressions", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        shard = write_shard(Path(d), a.impressions)

        def checked() -> None:
            assert sum(1 for _ in read_impressions(shard, True, N_NEWS)) == a.impressions

        parts = {
            "checked": checked,
            "tar_only": lambda: _tar_only(shard.path),
            "sha256_file": lambda: sha256_file(shard.path),
        }
        timing = {k: _best(fn, a.repeat) for k, fn in parts.items()}
        size = shard.path.stat().st_size
    out = {
        "impressions": a.impressions,
        "shard_bytes": size,
        "shard_bytes_per_impression": round(size / a.impressions, 1),
        "divides_by": "impressions of the shard",
    }
    for k, (cpu, wall) in timing.items():
        out[f"{k}_cpu_s"], out[f"{k}_wall_s"] = round(cpu, 4), round(wall, 4)
        out[f"{k}_cpu_us_per_impression"] = round(cpu / a.impressions * 1e6, 2)
    out["sha256_share_of_checked_cpu"] = round(timing["sha256_file"][0] / timing["checked"][0], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
