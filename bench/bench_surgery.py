"""Cost of the fused surgery: MTRec step (2 groups, mtrec) vs single-task step (1 group, none).

Single process, DeepSpeed ZeRO-2 fp32 on CPU, the same batch and model for both; the ratio is
measured in one run (performance.md). The floor is ~1.67x (one forward, two backward passes vs
one of each). "surgery share" is everything MultiTaskGradients does beyond DeepSpeed's backward
and step (copy-out of the held group, Gram, combination), over the MTRec step time.

    .venv/bin/python bench/bench_surgery.py [--encoder tiny] [--steps 20]
Writes bench/results/surgery.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


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


def run(encoder: str, groups: dict, mode: str, batch, steps: int, warmup: int) -> dict:
    import deepspeed

    from mtrec_dist.hub import load_encoder
    from mtrec_dist.train.zero import MultiTaskGradients

    torch.manual_seed(0)
    model = Heads(load_encoder(encoder))
    cfg = {
        "train_micro_batch_size_per_gpu": batch[0].shape[0],
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    mtg = MultiTaskGradients(
        engine, model, list(groups), mode, "shared", model.shared_parameter_names()
    )
    times, shares, st = [], [], {}
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses = engine(*batch)
        mtg.backward({g: sum(w * losses[t] for t, w in m.items()) for g, m in groups.items()})
        st = mtg.step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            shares.append(st["surgery/time_s"])
    engine.destroy()
    return {
        "step_s_median": statistics.median(times),
        "surgery_s_median": statistics.median(shares),
        "extra_bytes": st["surgery/extra_bytes"],
        "partition_elems": st["surgery/partition_elems"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="tiny")
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
    s = min(runs_s, key=lambda r: r["step_s_median"])
    m = min(runs_m, key=lambda r: r["step_s_median"])
    elem = 4
    res = {
        "encoder": a.encoder,
        "zero_stage": 2,
        "device": dev,
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
        "command": f"python bench/bench_surgery.py --encoder {a.encoder} --steps {a.steps}",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, res)
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
