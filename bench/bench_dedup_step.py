"""Step time of ``data.dedup=rank`` against ``data.dedup=global``, paired on the same batches.

W gloo + DeepSpeed ZeRO-2 worker processes (spawned here, no Ray: its fixed start-up is
``bench_scaling``'s line) each hold TWO engines built from the same seed, one per mode, and
train both on the same loader micro-batches (``loader_for``: the trainer's own stream, epoch 0,
``--micro`` per rank, history ``--history``). Each step runs the two modes back to back, the
order alternating from step to step, so a change of machine load hits both modes alike. A step
is what ``train/loop.py`` runs: (global) ``exchange_batch``, forward, one backward per gradient
group, the fused surgery step (MTRec, surgery ``mtrec``).

What each figure divides by (all after ``--warmup`` steps):

* ``encoded``: titles the encoders ran on, summed over ranks and steps; per-rank mode counts
  each rank's distinct rows (``collate``), global mode W x S (S = ceil(U_g / W), pads included).
* ``cpu_s``: process CPU seconds (all threads: torch, gloo) summed over ranks and steps: the
  machine's total work, the figure a shared or oversubscribed CPU distorts least.
* ``critical_cpu_s``: per step the slowest rank's CPU seconds, summed over steps: the step time
  of W ranks that each had a processor of their own (every step ends in a collective, so the
  slowest rank sets the pace). Global mode gives every rank the same S titles; per-rank mode
  gives rank r its own U_r.
* ``wall_s``: rank 0's wall seconds per step, summed: W processes sharing this machine's cores.
* ``phases``: ``cpu_s`` split into exchange (global only), forward (of which ``encoder_fwd``:
  the title encoder's own forward, timed by hooks), backward (every group) and step (surgery
  + optimizer).

``rank_over_global`` divides per-rank mode's figure by global mode's: ``encoded`` is the encoder
work saved, ``cpu_s`` / ``critical_cpu_s`` the step time saved; the issue asks for the step
time to fall in proportion to the encoder work.

    python bench/bench_dedup_step.py --prepared DIR [--workers 4] [--micro 32] [--layers 2] \
        [--steps 6] [--warmup 1] [--out bench/results/dedup_step.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import NO_SHARDS, free_port  # noqa: E402

MODES = ("rank", "global")
ADAMW = (2e-5, (0.9, 0.999), 1e-8, 0.01)  # lr, betas, eps, weight decay: torch's defaults
PHASES = ("exchange", "forward", "encoder_fwd", "backward", "step")


class _Clock:
    """Process CPU seconds per phase, and the encoder forward's own share through hooks."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self._enc0 = 0.0
        encoder.register_forward_pre_hook(self._enc_start)
        encoder.register_forward_hook(self._enc_end)

    def _enc_start(self, *_):
        self._enc0 = time.process_time()

    def _enc_end(self, *_):
        self.cpu["encoder_fwd"] += time.process_time() - self._enc0

    def phase(self, name: str, t0: float) -> float:
        now = time.process_time()
        self.cpu[name] += now - t0
        return now


def _worker(rank: int, world: int, port: int, a: argparse.Namespace, out_path: str) -> None:
    from tests.gloo_workers import ds_config, init_gloo_deepspeed

    init_gloo_deepspeed(rank, world, port)
    import deepspeed
    import torch.distributed as dist

    from mtrec_dist.config import Config
    from mtrec_dist.data.batch import NewsTable
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.data.stream import loader_for
    from mtrec_dist.models.dedup import exchange_batch
    from mtrec_dist.models.outputs import group_losses
    from mtrec_dist.models.registry import build_model
    from mtrec_dist.train.ds_engine import MultiTaskGradients

    cfg = Config()
    cfg.data.root = cfg.data.prepared = a.prepared
    cfg.data.history_len, cfg.data.loader_workers = a.history, 0
    cfg.model.name, cfg.model.encoder, cfg.model.encoder_layers = "mtrec", a.encoder, a.layers
    cfg.trainer.micro_batch, cfg.trainer.surgery = a.micro, "mtrec"
    manifest = load_manifest(a.prepared)
    ds = ds_config(2, a.micro, 1, world, ADAMW, clip=1.0)  # ZeRO-2, no accumulation
    runs = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = build_model(cfg, manifest)
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds
        )
        groups = cfg.model.groups
        mtg = MultiTaskGradients(
            engine, model, list(groups), "mtrec", "shared", model.shared_parameter_names()
        )
        runs[mode] = (engine, mtg, _Clock(model.encoder), groups)
    table = NewsTable(a.prepared)
    loader = loader_for(cfg, rank=rank, world_size=world, epoch=0)
    batches = list(islice(loader, a.warmup + a.steps))
    if not all(bool(b.sample_mask.any()) for b in batches):
        raise SystemExit(f"rank {rank}: padding-only batches: {NO_SHARDS}")
    steps = []
    for i, batch in enumerate(batches):
        rec = {}
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            engine, mtg, clock, groups = runs[mode]
            if i == a.warmup:
                clock.cpu = dict.fromkeys(PHASES, 0.0)
            dist.barrier()
            w0 = time.perf_counter()
            c = c0 = time.process_time()
            b = batch
            if mode == "global":
                b = exchange_batch(batch, table, engine.device)
                c = clock.phase("exchange", c)
            out = engine(b)
            c = clock.phase("forward", c)
            mtg.backward(group_losses(out.losses, groups))
            c = clock.phase("backward", c)
            mtg.step(i)
            c = clock.phase("step", c)
            rec[mode] = {
                "cpu_s": c - c0,
                "wall_s": time.perf_counter() - w0,
                "encoded": int(b.num_titles),
                "loss": float(out.losses["main"].detach()),
            }
        steps.append(rec)
    mine = {
        "steps": steps[a.warmup :],
        "phases": {m: runs[m][2].cpu for m in MODES},
    }
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        Path(out_path).write_text(json.dumps(every))
    for m in MODES:
        runs[m][0].destroy()


def summarize(per_rank: list[dict]) -> dict:
    """Totals per mode over ranks and steps, and per-rank over global (see the docstring)."""
    n = len(per_rank[0]["steps"])
    res: dict = {}
    for m in MODES:
        steps = [[r["steps"][s][m] for r in per_rank] for s in range(n)]  # [step][rank]
        res[m] = {
            "encoded": sum(x["encoded"] for st in steps for x in st),
            "cpu_s": round(sum(x["cpu_s"] for st in steps for x in st), 3),
            "critical_cpu_s": round(sum(max(x["cpu_s"] for x in st) for st in steps), 3),
            "wall_s": round(sum(st[0]["wall_s"] for st in steps), 3),
            "phases": {p: round(sum(r["phases"][m][p] for r in per_rank), 3) for p in PHASES},
            "main_loss_rank0": [round(st[0]["loss"], 6) for st in steps],
            "cpu_s_per_step_rank": [[round(x["cpu_s"], 3) for x in st] for st in steps],
            "encoded_per_step_rank": [[x["encoded"] for x in st] for st in steps],
        }
    res["rank_over_global"] = {
        k: round(res["rank"][k] / res["global"][k], 3)
        for k in ("encoded", "cpu_s", "critical_cpu_s", "wall_s")
    }
    res["rank_over_global"]["encoder_fwd"] = round(
        res["rank"]["phases"]["encoder_fwd"] / res["global"]["phases"]["encoder_fwd"], 3
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", required=True, help="prepared folder with a train split")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--layers", type=int, default=2, help="model.encoder_layers")
    ap.add_argument("--history", type=int, default=50)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/results/dedup_step.json"))
    a = ap.parse_args()
    a.prepared = str(Path(a.prepared).resolve())
    from mtrec_dist.utils import atomic_write_json

    tmp = Path(a.out).with_suffix(".ranks.json")
    t0 = time.time()
    mp.spawn(_worker, args=(a.workers, free_port(), a, str(tmp)), nprocs=a.workers, join=True)
    per_rank = json.loads(tmp.read_text())
    tmp.unlink()
    res = {
        "benchmark": "dedup step: data.dedup rank vs global, paired batches, ZeRO-2, gloo",
        "workers": a.workers,
        "micro_batch": a.micro,
        "encoder": f"{a.encoder}, model.encoder_layers={a.layers}",
        "history_len": a.history,
        "steps": a.steps,
        "warmup_steps": a.warmup,
        "prepared": a.prepared,
        **summarize(per_rank),
        "run_wall_s": round(time.time() - t0, 1),
        "command": "python bench/bench_dedup_step.py " + " ".join(sys.argv[1:]),
    }
    atomic_write_json(a.out, res)
    print(json.dumps({k: res[k] for k in ("rank", "global", "rank_over_global")}, indent=1))


if __name__ == "__main__":
    main()
