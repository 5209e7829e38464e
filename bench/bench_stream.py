"""Training-stream throughput of ONE process, next to what one H100 consumes.

    python bench/bench_stream.py --prepared DIR [--max-shards 8] [--out FILE]

Streams one epoch of the train split on one rank (world_size 1) with batch 32, neg_k 4,
history 50, dedup on, ``loader_workers=0``: shard reading, the checks, negative sampling,
shuffling and collation all run in this one process, so the figure is per process.

What it divides by: real training samples (one per click; padding samples are not counted)
streamed in the epoch, divided by (a) the wall-clock seconds of the loop (loader set-up
included) and (b) the CPU seconds this process used in the loop (``time.process_time``; with
``loader_workers=0`` no other process works for it). On a shared machine the wall figure moves
with the load; the CPU figure is what one idle core would give. The best of ``--repeat`` epochs
is kept (each epoch has other negatives and order; the work is the same).

``--loader-workers 2`` measures the usual configuration too; it is 3 processes (the trainer and
2 DataLoader workers), the JSON says so, and its CPU time counts the trainer process only.

Use MIND-shaped data: a folder prepared from ``mtrec synth --scale large`` (without
``--prepared``, synthetic small data is generated and prepared: a smoke run, not the figure). ``--max-shards N``
streams only the first N train shards (a view folder with the same news table and a manifest
listing those shards), so an epoch takes minutes, not an hour. The JSON also reports the
split's shard bytes per impression. The reference is the ~700 samples/s an H100 trains at
with a bert-base encoder (batch 32, 50 history + 5 candidate titles); the target is >= 10x.

The script only uses ``train_loader`` and ``load_manifest``, so it runs unchanged against an
older checkout (``PYTHONPATH=OLD_CHECKOUT python bench/bench_stream.py ...``) for old-vs-new
figures on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("PYTHONPATH"):  # an explicit PYTHONPATH picks the checkout measured
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec_dist.data.prepared import load_manifest  # noqa: E402
from mtrec_dist.data.stream import train_loader  # noqa: E402
from mtrec_dist.utils import Progress, atomic_write_json  # noqa: E402

H100_SAMPLES_PER_S = 700.0
TARGET_RATIO = 10.0
SPLIT = "train"


def _via_prepare(work: Path) -> Path:
    """No --prepared: synthetic.generate(scale="small") + prepare (not MIND-large's size: the
    JSON's ``prepared`` says so)."""
    from mtrec_dist.config import Config
    from mtrec_dist.data.prepare import prepare
    from mtrec_dist.data.synthetic import generate

    raw, out = work / "raw", work / "prepared"
    generate(raw, scale="small")
    cfg = Config()
    cfg.data.root, cfg.data.prepared = str(raw), str(out)
    cfg.data.splits = [SPLIT]
    prepare(cfg)
    return out


def subset_view(prepared: Path, max_shards: int, work: Path) -> Path:
    """A prepared folder holding only the first ``max_shards`` train shards: links to the
    news table, vocabularies and shard files, and a manifest listing those shards."""
    m = load_manifest(prepared)
    tr = m["splits"][SPLIT]
    keep = tr["shards"][:max_shards]
    tr.update(
        shards=keep,
        impressions=sum(s["impressions"] for s in keep),
        clicks=sum(s["clicks"] for s in keep),
    )
    m["splits"] = {SPLIT: tr}
    view = work / "view"
    view.mkdir()
    for name in ("news", "vocab", "shards"):
        if (prepared / name).exists():
            (view / name).symlink_to((prepared / name).resolve())
    (view / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    return view


def _epoch(prepared: Path, loader_workers: int, epoch: int) -> dict:
    w0, c0 = time.perf_counter(), time.process_time()
    loader = train_loader(
        prepared,
        rank=0,
        world_size=1,
        batch_size=32,
        epoch=epoch,
        seed=0,
        neg_k=4,
        history_len=50,
        loader_workers=loader_workers,
        dedup=True,
    )
    prog = Progress(f"stream workers={loader_workers}", len(loader), "batches")
    titles = slots = 0
    for b in loader:
        titles += b.num_titles
        slots += int(b.hist_mask.sum() + b.cand_mask.sum())
        prog.update()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    prog.close()
    n = loader.position
    return {
        "loader_workers": loader_workers,
        "processes": 1 + loader_workers,
        "samples": n,
        "batches": loader.batches_done,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "samples_per_s_wall": round(n / wall, 1),
        "samples_per_s_cpu": round(n / cpu, 1) if loader_workers == 0 else None,
        "unique_titles_per_batch": round(titles / max(loader.batches_done, 1), 1),
        "title_slots_per_batch": round(slots / max(loader.batches_done, 1), 1),
    }


def measure(prepared: Path, loader_workers: int, repeat: int) -> dict:
    runs = [_epoch(prepared, loader_workers, e) for e in range(repeat)]
    best = max(runs, key=lambda r: r["samples_per_s_wall"])
    return {
        **best,
        "all_samples_per_s_wall": [r["samples_per_s_wall"] for r in runs],
        "all_samples_per_s_cpu": [r["samples_per_s_cpu"] for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepared", default="", help="prepared folder (default: synthetic small)")
    ap.add_argument("--max-shards", type=int, default=0, help="first N train shards (0 = all)")
    ap.add_argument("--loader-workers", default="0", help="comma list; 0 = one process")
    ap.add_argument("--repeat", type=int, default=1, help="epochs per setting; best is kept")
    ap.add_argument("--out", default="bench/results/stream.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(args.prepared) if args.prepared else _via_prepare(Path(tmp))
        full = load_manifest(prepared)["splits"][SPLIT]
        shard_bytes = sum((prepared / s["path"]).stat().st_size for s in full["shards"])
        src = subset_view(prepared, args.max_shards, Path(tmp)) if args.max_shards else prepared
        m = load_manifest(src)["splits"][SPLIT]
        m_version = load_manifest(prepared)["format_version"]
        load0 = os.getloadavg()[0]
        results = [
            measure(src, int(w), args.repeat) for w in args.loader_workers.split(",") if w.strip()
        ]
    import mtrec_dist

    report = {
        "benchmark": "stream",
        "code": str(Path(mtrec_dist.__file__).resolve().parent.parent),
        "prepared": args.prepared or "synthetic small (generated; not MIND-large's size)",
        "format_version": m_version,
        "shards_streamed": len(m["shards"]),
        "train_impressions_streamed": m["impressions"],
        "train_clicks_streamed": m["clicks"],
        "divides_by": "real training samples (one per click) of the epoch / seconds of the "
        "loop: wall clock (samples_per_s_wall) and CPU time of this process (samples_per_s_cpu,"
        " only for loader_workers=0, where this one process does all the work)",
        "shard_bytes_per_impression": round(shard_bytes / max(full["impressions"], 1), 1),
        "shard_bytes_how": f"bytes of all {len(full['shards'])} {SPLIT} shard files / "
        f"{full['impressions']} {SPLIT} impressions",
        "batch_size": 32,
        "neg_k": 4,
        "history_len": 50,
        "dedup": True,
        "h100_bert_base_samples_per_s": H100_SAMPLES_PER_S,
        "target_samples_per_s_per_process": H100_SAMPLES_PER_S * TARGET_RATIO,
        "results": results,
        "cpu_count": os.cpu_count(),
        "load_avg_1m_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "machine": platform.platform(),
    }
    atomic_write_json(args.out, report)
    print(f"shard bytes per impression: {report['shard_bytes_per_impression']}")
    for r in results:
        cpu = r["samples_per_s_cpu"]
        print(
            f"loader_workers={r['loader_workers']} ({r['processes']} process(es)): "
            f"{r['samples_per_s_wall']:,.0f} samples/s wall"
            + (f", {cpu:,.0f} samples/s of CPU time" if cpu else "")
            + f" ({r['samples']} samples, {r['wall_s']} s wall, {r['cpu_s']} s CPU)"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
