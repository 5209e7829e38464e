"""Cost of the fused surgery: MTRec step (2 groups, mtrec) vs single-task step (1 group, none).

Single process, DeepSpeed ZeRO-2 fp32 (CUDA when there is one, else CPU), every ratio measured
side by side in one run (performance.md), each configuration run twice, the faster kept:

* ``registered_models``: the registered ``mtrec`` (groups main + aux, surgery ``mtrec``) vs the
  ``bert`` baseline (main only) on the models benchmark's recommendation batch: the issue's
  "MTRec step / BERT-baseline step" (target <= 1.8x; floor ~1.67x = one forward and two
  backward passes vs one of each, when the encoder dominates);
* the same encoder + heads with all three losses in one group vs two groups: the cost of the
  second backward alone, at a larger title batch (``--batch`` x ``--seq``).

"surgery share" is everything MultiTaskGradients does beyond DeepSpeed's backward and step
(copy-out of the held group, Gram, combination), over the MTRec step time (target <= 3%);
"extra_over_partition" is its buffer over this rank's gradient partition (target <= T-1 = 1).

    .venv/bin/python bench/bench_surgery.py [--encoder minilm] [--steps 10] [--batch 32]
Writes bench/results/surgery.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_models (the shared batch)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Heads(nn.Module):
    """Encoder + click head (main) + category and NER heads (aux), MTRec-shaped losses."""

    def __init__(self, encoder) -> None:
        super().__init__()
        d = encoder.config.hidden_size
        self.encoder = encoder
        self.main_head, self.cat_head, self.ner_head = (
            nn.Linear(d, 1),
            nn.Linear(d, 18),
            nn.Linear(d, 3),
        )

    def forward(self, ids, y, cat, ner):
        h = self.encoder(input_ids=ids).last_hidden_state  # [B, L, D]
        cls = h[:, 0]  # [B, D]
        return {
            "main": F.binary_cross_entropy_with_logits(self.main_head(cls).squeeze(-1), y),
            "category": F.cross_entropy(self.cat_head(cls), cat),
            "ner": F.cross_entropy(self.ner_head(h).reshape(-1, 3), ner.reshape(-1)),
        }

    def shared_parameter_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith("encoder.")}


def _timed_steps(model, micro: int, groups: dict, mode: str, losses_of, steps: int, warmup: int):
    """ZeRO-2 engine + MultiTaskGradients on ``model``; median step and surgery seconds.

    ``losses_of(engine)`` runs the forward and returns the per-task losses.
    """
    import deepspeed

    from mtrec_dist.models.outputs import group_losses
    from mtrec_dist.train.ds_engine import MultiTaskGradients

    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    mtg = MultiTaskGradients(
        engine, model, list(groups), mode, "shared", model.shared_parameter_names()
    )
    times, shares, st = [], [], {}
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        mtg.backward(group_losses(losses_of(engine), groups))
        st = mtg.step(i)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            shares.append(st["surgery/time_s"])
    engine.destroy()
    return {
        "step_s_median": statistics.median(times),
        "surgery_s_median": statistics.median(shares),
        "extra_bytes": st["surgery/extra_bytes"],
        "partition_elems": st["surgery/partition_elems"],
    }


def run(encoder: str, groups: dict, mode: str, batch, steps: int, warmup: int) -> dict:
    """Encoder + heads on a ``[batch, seq]`` title batch; all three losses in ``groups``."""
    from mtrec_dist.hub import load_encoder

    torch.manual_seed(0)
    model = Heads(load_encoder(encoder))
    return _timed_steps(model, batch[0].shape[0], groups, mode, lambda e: e(*batch), steps, warmup)


def run_models(encoder: str, name: str, mode: str, steps: int, warmup: int) -> dict:
    """The registered model ``name`` (MTRec: groups main/aux; bert: main only) on the
    models benchmark's batch (8 impressions, 50 history, 1+4 candidates, de-duplicated)."""
    from bench_models import N_CAT, N_ENT, bench_batch

    from mtrec_dist.config import ModelConfig
    from mtrec_dist.hub import load_encoder
    from mtrec_dist.models.registry import MODELS

    groups = ModelConfig().groups if name == "mtrec" else {"main": {"main": 1.0}}
    meta = {
        "has_sentiment": False,
        "vocab": {"category": N_CAT, "subcategory": 1, "entities": N_ENT},
    }
    torch.manual_seed(0)
    model = MODELS[name](ModelConfig(name=name, encoder=encoder), meta, load_encoder(encoder))
    batch = bench_batch(0)
    return _timed_steps(model, 8, groups, mode, lambda e: e(batch).losses, steps, warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--out", default="bench/results/surgery.json")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", "29561"),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed

    from mtrec_dist.utils import atomic_write_json

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend="gloo" if not torch.cuda.is_available() else "nccl", verbose=False
    )
    g = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    batch = (
        torch.randint(0, 30000, (a.batch, a.seq), generator=g).to(dev),
        torch.randint(0, 2, (a.batch,), generator=g).float().to(dev),
        torch.randint(0, 18, (a.batch,), generator=g).to(dev),
        torch.randint(0, 3, (a.batch, a.seq), generator=g).to(dev),
    )
    single = {"all": {"main": 1.0, "category": 0.3, "ner": 0.3}}
    mtrec = {"main": {"main": 1.0}, "aux": {"category": 0.3, "ner": 0.3}}
    # alternate the two twice and keep each one's faster run: the machine is shared
    runs_s, runs_m = [], []
    for _ in range(2):
        runs_s.append(run(a.encoder, single, "none", batch, a.steps, a.warmup))
        runs_m.append(run(a.encoder, mtrec, "mtrec", batch, a.steps, a.warmup))
    # the registered models on a news-recommendation batch: MTRec (2 groups) vs BERT baseline
    runs_b, runs_t = [], []
    for _ in range(2):
        runs_b.append(run_models(a.encoder, "bert", "none", a.steps, a.warmup))
        runs_t.append(run_models(a.encoder, "mtrec", "mtrec", a.steps, a.warmup))
    rb = min(runs_b, key=lambda r: r["step_s_median"])
    rt = min(runs_t, key=lambda r: r["step_s_median"])
    s = min(runs_s, key=lambda r: r["step_s_median"])
    m = min(runs_m, key=lambda r: r["step_s_median"])
    elem = 4
    res = {
        "encoder": a.encoder,
        "zero_stage": 2,
        "device": dev,
        "registered_models": {
            "batch": "8 impressions, history 50, 1+4 candidates, titles of 20, de-duplicated",
            "bert_baseline_step_s": rb["step_s_median"],
            "mtrec_step_s": rt["step_s_median"],
            "ratio_mtrec_over_bert": rt["step_s_median"] / rb["step_s_median"],
            "surgery_s": rt["surgery_s_median"],
            "surgery_share_of_step": rt["surgery_s_median"] / rt["step_s_median"],
        },
        "batch": [a.batch, a.seq],
        "single_task_step_s": s["step_s_median"],
        "mtrec_step_s": m["step_s_median"],
        "ratio_mtrec_over_single": m["step_s_median"] / s["step_s_median"],
        "ratio_target": 1.8,
        "ratio_floor": 5 / 3,
        "surgery_s": m["surgery_s_median"],
        "surgery_share_of_step": m["surgery_s_median"] / m["step_s_median"],
        "surgery_share_target": 0.03,
        "extra_bytes": m["extra_bytes"],
        "partition_bytes": m["partition_elems"] * elem,
        "extra_over_partition": m["extra_bytes"] / max(1.0, m["partition_elems"] * elem),
        "command": "python bench/bench_surgery.py " + " ".join(sys.argv[1:]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, res)
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
