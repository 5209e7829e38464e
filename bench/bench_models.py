"""Model step cost per real sample, and the titles that de-duplication saves per real slot.

    python bench/bench_models.py --prepared DIR [--batch 8] [--batches 4] [--encoders tiny,minilm]
        [--models mtrec,bert,...] [--threads 1] [--dedup-batch-sizes 8,32] [--dedup-samples 0]
        [--out FILE]

DIR is a prepared folder with a ``train`` split (``mtrec prepare``; MIND-shaped data: synthetic
``--scale large`` or MIND itself). Both parts read batches from the real training stream
(``train_loader``, epoch 0, seed 0, history 50, K = 4 negatives, de-duplicated), so history
lengths, title lengths, repeated titles and padding are the data's own.

1. **Step cost.** Forward + backward (sum of every task loss) of each registered model, built
   by ``build_model`` from the folder's manifest, over the same ``--batches`` batches of
   ``--batch`` samples (one untimed warm-up pass first). Reported per model: process CPU
   seconds and wall seconds summed over those batches, each divided by the real samples they
   hold (``*_per_real_sample``) and by their real slots (``*_per_real_slot``: real history +
   real candidate slots); ratios against ``bert`` from the same run (CPU to CPU, wall to wall).
   CPU time is this process's, all ``--threads`` torch threads together.
2. **De-duplication.** Over the first ``--dedup-samples`` training samples (0 = the whole
   epoch) at each batch size: titles the encoder runs on per real slot (de-duplicated:
   ``encoded_per_real_slot``, which includes the padding title once per batch that has
   padding), distinct news per real slot (``distinct_per_real_slot``), and the saving
   ``naive_over_encoded`` = real slots / titles encoded. Without de-duplication the encoder
   would run once per real slot; padding slots and padding samples are counted in neither.

Writes bench/results/models.json (partial results after each part).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import Stopwatch, batch_shape, loader_batches, ratio, title_counts  # noqa: E402

from mtrec_dist.config import Config  # noqa: E402
from mtrec_dist.data.batch import Batch  # noqa: E402
from mtrec_dist.data.prepared import load_manifest  # noqa: E402
from mtrec_dist.models.registry import MODEL_NAMES, build_model  # noqa: E402
from mtrec_dist.utils import Progress, atomic_write_json  # noqa: E402

HISTORY, NEG_K = 50, 4


def build(prepared: Path, name: str, encoder: str) -> torch.nn.Module:
    """Registered model ``name`` on ``encoder`` as the trainer builds it for ``prepared``."""
    cfg = Config()
    cfg.data.prepared, cfg.model.name, cfg.model.encoder = str(prepared), name, encoder
    torch.manual_seed(0)
    return build_model(cfg, load_manifest(prepared))


def time_model(model: torch.nn.Module, batches: list[Batch]) -> dict:
    """Forward + backward of the summed task losses on each batch; the first pass is warm-up."""
    model.train()
    sw = Stopwatch()
    for b in [batches[0], *batches]:
        model.zero_grad(set_to_none=True)
        with sw:
            res = model(b)
            sum(res.losses.values()).backward()
    return {**sw.summary(skip=1), "tasks": sorted(res.losses)}


def time_models(
    prepared: Path,
    encoder: str,
    batches: list[Batch],
    names: list[str],
    out: dict,
    save: Callable[[], None],
) -> None:
    """Fill ``out[name]`` model by model, calling ``save()`` after each (a slow model later
    in the list does not lose the figures before it)."""
    samples = sum(int(b.sample_mask.sum()) for b in batches)
    slots = title_counts(batches)["real_slots"]
    prog = Progress(f"models on {encoder}", len(names), "models", every=1.0)
    for name in names:
        try:
            r = time_model(build(prepared, name, encoder), batches)
        except Exception as e:  # a model this folder cannot feed: say so, go on
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            prog.update()
            continue
        for clock in ("cpu", "wall"):
            r[f"{clock}_s_per_real_sample"] = r[f"{clock}_s_total"] / samples
            r[f"{clock}_s_per_real_slot"] = r[f"{clock}_s_total"] / slots
        out[name] = r
        ref = out.get("bert")
        if ref and "error" not in ref:
            for v in out.values():
                if "error" not in v:
                    v["vs_bert"] = ratio(v, ref)
        save()
        prog.update(extra=name)


def dedup_counts(prepared: Path, batch_sizes: list[int], max_samples: int) -> dict:
    """:func:`title_counts` over the training stream's first ``max_samples`` samples (0 = all)."""
    from mtrec_dist.data.stream import train_loader

    out = {}
    for bs in batch_sizes:
        loader = train_loader(
            prepared, rank=0, world_size=1, batch_size=bs, epoch=0, seed=0,
            history_len=HISTORY, neg_k=NEG_K, loader_workers=0,
        )  # fmt: skip
        n_batches = len(loader) if not max_samples else min(len(loader), -(-max_samples // bs))
        prog = Progress(f"titles at batch {bs}", n_batches, "batches")

        def stream(loader=loader, n=n_batches, prog=prog):
            for _, b in zip(range(n), loader):
                prog.update()
                yield b

        out[f"batch_{bs}"] = title_counts(stream())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", required=True, help="prepared folder with a train split")
    ap.add_argument("--out", default=str(ROOT / "bench/results/models.json"))
    ap.add_argument("--batch", type=int, default=8, help="samples per timed batch")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per model")
    ap.add_argument("--encoders", default="tiny,minilm", help="'' = no timing")
    ap.add_argument("--models", default=",".join(MODEL_NAMES), help="models to time (bert first)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU figures per them)")
    ap.add_argument("--dedup-batch-sizes", default="8,32")
    ap.add_argument("--dedup-samples", type=int, default=0, help="0 = the whole epoch")
    ap.add_argument("--skip-dedup", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prepared = Path(args.prepared)

    batches = loader_batches(prepared, batch_size=args.batch, n=args.batches, history_len=HISTORY)
    result: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": args.threads,
        },
        "prepared": str(prepared),
        "command": "python bench/bench_models.py " + " ".join(sys.argv[1:]),
        "timed_batches": {"batch_size": args.batch, **batch_shape(batches)},
        "fwd_bwd": {},
    }
    names = args.models.split(",")
    for enc in [e for e in args.encoders.split(",") if e]:
        result["fwd_bwd"][enc] = {}
        time_models(
            prepared, enc, batches, names, result["fwd_bwd"][enc],
            save=lambda: atomic_write_json(args.out, result),  # partial results survive
        )  # fmt: skip
    if not args.skip_dedup:
        result["titles_per_real_slot"] = {
            "samples": args.dedup_samples or "whole epoch",
            **dedup_counts(
                prepared, [int(x) for x in args.dedup_batch_sizes.split(",")], args.dedup_samples
            ),
        }
    atomic_write_json(args.out, result)
    import json

    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
