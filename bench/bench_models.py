"""Model step cost and the titles that de-duplication saves.

    python bench/bench_models.py --out bench/results/models.json [--prepared DIR] [--skip-minilm]

1. Forward + backward (sum of every task loss) wall time per sample for each registered model
   at one fixed batch: 8 samples, 50 history, K = 4 negatives, titles of 20 word pieces,
   de-duplicated, on the tiny random BERT and on MiniLM-L6 (few iterations: slow on CPU).
   The batch draws news by a Zipf law over 2,000 rows so that it repeats titles as real
   clicks do. Ratios are against ``bert`` (single task) measured in the same run.
2. Titles encoded per training sample with and without de-duplication on the synthetic
   ``small`` training set (``mtrec_dist.data.synthetic.generate`` + ``shards.prepare`` +
   ``stream.train_loader``), one full epoch at micro-batches 8 and 32.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtrec_dist.config import ModelConfig  # noqa: E402
from mtrec_dist.data.batch import NER_IGNORE, Sample, collate  # noqa: E402
from mtrec_dist.hub import load_encoder  # noqa: E402
from mtrec_dist.models.registry import MODEL_NAMES, MODELS  # noqa: E402
from mtrec_dist.utils import Progress, atomic_write_json  # noqa: E402

B, H, K, TITLE_LEN, N_NEWS, N_CAT, N_ENT = 8, 50, 4, 20, 2000, 18, 500


class _Table:
    """Random news table with the NewsTable attributes ``collate`` reads (titles of 20)."""

    def __init__(self, rng: np.random.Generator):
        self.tokens = np.zeros((N_NEWS, TITLE_LEN), np.int64)
        self.ner = np.full((N_NEWS, TITLE_LEN), NER_IGNORE, np.int64)
        self.tokens[:, 0], self.tokens[:, -1] = 101, 102
        self.tokens[:, 1:-1] = rng.integers(1000, 29000, (N_NEWS, TITLE_LEN - 2))
        self.ner[:, 1:-1] = rng.integers(0, 3, (N_NEWS, TITLE_LEN - 2))
        self.category = rng.integers(1, N_CAT, N_NEWS)
        self.subcategory = np.zeros(N_NEWS, np.int64)
        self.sentiment = rng.integers(0, 3, N_NEWS)
        self.entities = rng.integers(0, N_ENT, (N_NEWS, 5))


def bench_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    table = _Table(rng)
    p = 1.0 / np.arange(1, N_NEWS) ** 1.1
    p /= p.sum()
    draw = lambda n: 1 + rng.choice(N_NEWS - 1, size=n, p=p)  # noqa: E731
    samples = [
        Sample(i, draw(H), draw(1 + K), np.array([1.0] + [0.0] * K, np.float32)) for i in range(B)
    ]
    return collate(samples, table, batch_size=B, history_len=H)


def time_models(encoder: str, iters: int, batch) -> dict:
    meta = {
        "has_sentiment": False,
        "vocab": {"category": N_CAT, "subcategory": 1, "entities": N_ENT},
    }
    out: dict = {}
    prog = Progress(f"models on {encoder}", len(MODEL_NAMES), "models", every=1.0)
    for name in MODEL_NAMES:
        try:
            torch.manual_seed(0)
            model = MODELS[name](
                ModelConfig(name=name, encoder=encoder), meta, load_encoder(encoder)
            )
            model.train()
            times = []
            for i in range(iters + 1):  # first = warm-up
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                res = model(batch)
                sum(res.losses.values()).backward()
                if i:
                    times.append(time.perf_counter() - t0)
        except Exception as e:  # another helper's model missing or broken: say so, go on
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            prog.update()
            continue
        out[name] = {
            "s_per_sample": float(np.median(times)) / B,
            "tasks": sorted(res.losses),
            "iters": iters,
        }
        prog.update(extra=name)
    ref = out.get("bert", {}).get("s_per_sample")
    for v in out.values():
        if ref and "s_per_sample" in v:
            v["ratio_vs_bert"] = v["s_per_sample"] / ref
    return out


def dedup_titles(prepared: Path, batch_sizes: tuple[int, ...]) -> dict:
    from mtrec_dist.data.stream import train_loader

    out = {}
    for bs in batch_sizes:
        row = {}
        for dedup in (True, False):
            loader = train_loader(
                prepared, rank=0, world_size=1, batch_size=bs, epoch=0, seed=0,
                history_len=50, loader_workers=0, dedup=dedup,
            )  # fmt: skip
            titles = real_slots = samples = 0
            prog = Progress(f"stream bs={bs} dedup={dedup}", len(loader), "batches")
            for b in loader:
                n = int(b.sample_mask.sum())
                samples += n
                titles += b.num_titles
                real_slots += int(b.hist_mask.sum() + b.cand_mask.sum())
                prog.update()
            key = "dedup" if dedup else "naive"
            row[key] = titles / max(samples, 1)
            row["real_slots_per_sample"] = real_slots / max(samples, 1)
            row["samples"] = samples
        row["reduction"] = row["naive"] / row["dedup"]
        out[f"batch_{bs}"] = row
    return out


def prepare_small(work: Path) -> Path:
    from mtrec_dist.config import Config
    from mtrec_dist.data.shards import prepare
    from mtrec_dist.data.synthetic import generate

    raw, out = work / "raw", work / "prepared"
    generate(raw, scale="small")
    cfg = Config()
    cfg.data.root, cfg.data.prepared, cfg.data.splits = str(raw), str(out), ["train"]
    cfg.model.encoder = "minilm"
    prepare(cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/models.json"))
    ap.add_argument("--prepared", default="", help="reuse a prepared synthetic small folder")
    ap.add_argument("--tiny-iters", type=int, default=5)
    ap.add_argument("--minilm-iters", type=int, default=2)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-dedup", action="store_true")
    args = ap.parse_args()

    batch = bench_batch()
    time_models("tiny", 1, batch)  # warm-up: lazy init, allocator, thread pools
    result: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "batch": {
            "samples": B,
            "history": H,
            "neg_k": K,
            "title_len": TITLE_LEN,
            "unique_titles": batch.num_titles,
            "slots": B * (H + 1 + K),
        },  # fmt: skip
        "fwd_bwd": {"tiny": time_models("tiny", args.tiny_iters, batch)},
    }
    atomic_write_json(args.out, result)  # partial results survive a slow later phase
    if not args.skip_minilm:
        result["fwd_bwd"]["minilm"] = time_models("minilm", args.minilm_iters, batch)
    atomic_write_json(args.out, result)
    if not args.skip_dedup:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                prepared = Path(args.prepared) if args.prepared else prepare_small(Path(tmp))
                result["titles_per_sample"] = {
                    "dataset": "synthetic small (train split), one epoch, history 50, K=4",
                    **dedup_titles(prepared, (8, 32)),
                }
        except ImportError as e:
            result["titles_per_sample"] = {"error": f"data modules missing: {e}"}
    atomic_write_json(args.out, result)
    import json

    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
