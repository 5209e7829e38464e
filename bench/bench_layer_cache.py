"""Step cost of training the top N encoder layers over the frozen layers' cache, against the
whole encoder; the cache's build time and size, projected to MIND-large's 161k news.

    python bench/bench_layer_cache.py [--data DIR] [--layers 1 2] [--steps 6] [--rounds 2]
                                      [--out bench/results/layer_cache.json]

Side by side in one process on the same micro-batches: one reference-trainer MTRec step
(forward, the two group gradients, surgery, AdamW; ``train/local.py reference_step``) with
``model.train_layers`` = 0 (every layer, the papers) and each N of ``--layers``, the modes
alternating round by round so that machine load hits them alike. Reported per mode: CPU
seconds per step (this process, all threads), the ratio to the whole encoder, and trainable
parameters. The cache of each N is built first (its build CPU time and bytes per news are
measured on the synthetic small news table) and projected to 161,000 news at titles of 20 and
32 word pieces (docs/design.md §3.1).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mtrec_dist.config import load_config  # noqa: E402
from mtrec_dist.data.batch import NewsTable  # noqa: E402
from mtrec_dist.data.prepared import load_manifest  # noqa: E402
from mtrec_dist.data.stream import loader_for  # noqa: E402
from mtrec_dist.models import layer_cache  # noqa: E402
from mtrec_dist.models.registry import build_model, resolve_groups  # noqa: E402
from mtrec_dist.train.local import reference_step  # noqa: E402
from mtrec_dist.train.optim import build_optimizer  # noqa: E402
from mtrec_dist.utils import atomic_write_json  # noqa: E402

MIND_LARGE_NEWS = 161_000


def _ensure_data(data: Path) -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_quality import ensure_data

    return ensure_data(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="/tmp/mtrec_bench_quality/data")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rebuild", action="store_true", help="time the cache build from scratch")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "layer_cache.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = _ensure_data(Path(a.data))
    base = [f"data.root={data}", "model.encoder=minilm", "model.encoder_layers=0"]
    base += [f"trainer.micro_batch={a.batch}", "model.dropout=0", "run_dir=/tmp/unused"]
    modes = [0, *a.layers]
    cfgs = {
        n: load_config(ROOT / "configs" / "demo.yaml", [*base, f"model.train_layers={n}"])
        for n in modes
    }
    manifest = load_manifest(cfgs[0].prepared_dir)
    n_news = len(NewsTable(cfgs[0].prepared_dir))
    models, opts, cache = {}, {}, {}
    for n in modes:
        torch.manual_seed(0)
        m = build_model(cfgs[n], manifest)
        cfgs[n].model.groups = resolve_groups(cfgs[n], m)
        if n:
            if a.rebuild:
                key = layer_cache.cache_key(
                    m.encoder.bert, m.encoder.frozen_layers, NewsTable(cfgs[n].prepared_dir).tokens
                )
                shutil.rmtree(
                    layer_cache.cache_folder(cfgs[n].prepared_dir, key), ignore_errors=True
                )
            c0, t0 = time.process_time(), time.monotonic()
            c = layer_cache.attach(m, cfgs[n].prepared_dir, progress=False)
            cpu, wall = time.process_time() - c0, time.monotonic() - t0
            per_news_bytes = c.states.shape[1] * c.states.shape[2] * 4
            D = c.states.shape[2]
            cache[n] = {
                "frozen_layers": m.encoder.frozen_layers,
                "news": n_news,
                "build_cpu_s": cpu,
                "build_wall_s": wall,
                "built_now": cpu > 0.5,
                "bytes": int(c.states.nbytes),
                "bytes_per_news": per_news_bytes,
                "mind_large_projection": {
                    "build_cpu_hours_2cores": cpu / n_news * MIND_LARGE_NEWS / 3600,
                    "gib_title_20": MIND_LARGE_NEWS * 20 * D * 4 / 2**30,
                    "gib_title_32": MIND_LARGE_NEWS * 32 * D * 4 / 2**30,
                },
            }
        m.train()
        models[n], opts[n] = m, build_optimizer(m, cfgs[n].trainer)
    loader = loader_for(cfgs[0], rank=0, world_size=1, epoch=0)
    batches = [b for _, b in zip(range(a.steps + 1), loader)]
    cpu = {n: 0.0 for n in modes}
    for r in range(a.rounds):
        for n in modes if r % 2 == 0 else modes[::-1]:
            m, t = models[n], cfgs[n].trainer
            reference_step(
                m, [batches[0]], cfgs[n].model.groups, t.surgery, t.surgery_scope, opts[n]
            )  # warm-up
            c0 = time.process_time()
            for b in batches[1:]:
                reference_step(m, [b], cfgs[n].model.groups, t.surgery, t.surgery_scope, opts[n])
            cpu[n] += time.process_time() - c0
    steps = a.steps * a.rounds
    result = {
        "benchmark": "layer_cache",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": a.threads},
        "regime": vars(a),
        "modes": {
            str(n): {
                "train_layers": n,
                "cpu_s_per_step": cpu[n] / steps,
                "full_over_this": cpu[0] / cpu[n],
                "trainable_params": sum(
                    p.numel() for p in models[n].parameters() if p.requires_grad
                ),
            }
            for n in modes
        },
        "cache": {str(n): v for n, v in cache.items()},
    }
    atomic_write_json(a.out, result)
    print(f"{'train_layers':>12} {'CPU s/step':>11} {'full / this':>12} {'trainable':>11}")
    for n in modes:
        r = result["modes"][str(n)]
        print(
            f"{n or 'all':>12} {r['cpu_s_per_step']:>11.2f} {r['full_over_this']:>11.2f}x {r['trainable_params']:>11,}"
        )
    for n, c in cache.items():
        p = c["mind_large_projection"]
        print(
            f"cache N={n} ({c['frozen_layers']} frozen layers): {c['news']} news, "
            f"{c['bytes'] / 2**20:.0f} MiB, build {c['build_cpu_s']:.1f} CPU s"
            f"{'' if c['built_now'] else ' (already built; --rebuild to time it)'}; MIND-large "
            f"161k news: {p['gib_title_20']:.1f} GiB (titles 20) / {p['gib_title_32']:.1f} GiB "
            f"(32), build {p['build_cpu_hours_2cores']:.2f} CPU-hours"
        )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
