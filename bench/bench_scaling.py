"""Scale-out on one machine: cross-rank title de-duplication, MTRec against BERT, Ray's start-up.

On a prepared folder (MIND-shaped data: ``mtrec synth --scale large`` then ``mtrec prepare``),
every run through ``run_training`` (Ray Train + DeepSpeed ZeRO-2, loader_workers 0):

* ``dedup``: ``data.dedup=rank`` against ``data.dedup=global`` at each ``--workers`` count
  (1 thread per worker), MTRec with surgery, micro batch ``--micro`` per worker, each mode in
  its own Ray run (so machine load between runs distorts the comparison; the paired one, both
  modes on the same batches in the same processes, is ``bench_dedup_step.py``);
* ``models``: MTRec against BERT (the single-task baseline, no surgery) at 2 workers, default
  ``data.dedup`` (global);
* ``parallel`` (``--parallel``): data-parallel efficiency, 1 worker x 2 threads against 2
  workers x 1 thread at the same global batch (micro ``--micro`` / 2 each), samples/s ratio
  (target >= 0.85); 2 threads per worker in the 1-worker run;
* ``projection``: no training: the loader's per-rank batches at each ``--project WxM``
  (W ranks x micro batch M), counting the titles each mode encodes.

What each figure divides by:

* ``encoded_per_slot``: titles the encoders run on in a step, summed over ranks, divided by
  the step's REAL slots (real history slots + real candidates of real samples, all ranks).
  Per-rank mode encodes sum_r U_r (each rank's distinct rows, the pad row 0 included where a
  rank has a masked slot); global mode W * ceil(U_g / W) (the global distinct rows U_g plus at
  most W - 1 pad titles). ``distinct_per_slot`` = U_g / real slots. Counted on the id stream
  of exactly the batches the runs train on (same loader, seed and epoch), and for global runs
  also read back from the train log (``titles/encoded``).
* ``step_wall_s``: median over the steps after ``--warmup`` of rank 0's wall seconds per
  optimizer step (train log: ``global batch / throughput/samples_per_s``); ``step_cpu_s``:
  the median of rank 0's process CPU seconds in the same steps (``time/cpu_s``, all threads).
  The machine is shared: CPU time is the figure a loaded machine distorts least.
* ``startup_s``: Ray Train's fixed start-up, wall seconds from ``run_training``'s call to the
  START of the first optimizer step (its end stamp minus its own wall time): Ray, the worker
  group, the process group, DeepSpeed and the model build. ``steps_s``: the rest of the run.

    python bench/bench_scaling.py --prepared DIR [--encoder minilm --layers 2] [--micro 16] \
        [--steps 8] [--warmup 2] [--workers 2 4] [--project 8x128 16x16] \
        [--out bench/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import NO_SHARDS  # noqa: E402


def base_overrides(a, prepared: Path) -> list[str]:
    return [
        f"data.root={prepared}",
        f"data.prepared={prepared}",
        f"model.encoder={a.encoder}",
        f"model.encoder_layers={a.layers}",
        f"data.history_len={a.history}",
        "data.loader_workers=0",
        f"trainer.micro_batch={a.micro}",
        f"trainer.max_steps={a.steps}",
        "trainer.checkpoint_every=0",
        "trainer.lr=2e-5",
        "trainer.cpus_per_worker=1",
    ]


def id_stream(prepared: Path, world: int, micro: int, steps: int, history: int) -> dict:
    """Titles each mode encodes on the loader's first ``steps`` micro-batches of every rank."""
    from mtrec_dist.config import load_config
    from mtrec_dist.data.stream import loader_for
    from mtrec_dist.models.dedup import plan_exchange

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.root={prepared}",
            f"data.prepared={prepared}",
            f"trainer.micro_batch={micro}",
            f"data.history_len={history}",
            "data.loader_workers=0",
        ],
    )
    per_rank = [
        [
            (b.news_rows.numpy(), int(b.hist_mask.sum()) + int(b.cand_mask.sum()))
            for b in islice(loader_for(cfg, rank=r, world_size=world, epoch=0), steps)
        ]
        for r in range(world)
    ]
    n = min(len(x) for x in per_rank)
    if any(x[1] == 0 for r in per_rank for x in r[:n]):  # a rank without shards: no real slot
        raise SystemExit(f"{prepared}: a rank of {world} gets padding-only batches: {NO_SHARDS}")
    slots = rank_enc = glob_enc = distinct = 0
    per_step = []
    for s in range(n):
        rows = [per_rank[r][s][0] for r in range(world)]
        plan = plan_exchange(rows, 0)
        step = {
            "slots": sum(per_rank[r][s][1] for r in range(world)),
            "rank_encoded": sum(int(x.size) for x in rows),
            "global_distinct": int(plan.rows.size),
            "global_encoded": world * plan.share,
        }
        per_step.append(step)
        slots += step["slots"]
        rank_enc += step["rank_encoded"]
        glob_enc += step["global_encoded"]
        distinct += step["global_distinct"]
    return {
        "world": world,
        "micro_batch": micro,
        "global_batch": world * micro,
        "steps_counted": n,
        "real_slots": slots,
        "rank_encoded_per_slot": round(rank_enc / slots, 4),
        "global_encoded_per_slot": round(glob_enc / slots, 4),
        "distinct_per_slot": round(distinct / slots, 4),
        "encoder_work_rank_over_global": round(rank_enc / glob_enc, 3),
        "global_encoded_over_distinct": round(glob_enc / distinct, 4),
        "per_step": per_step,
    }


def measure(
    a, prepared: Path, tmp: Path, tag: str, workers: int, extra: list[str], micro: int = 0
) -> dict:
    from mtrec_dist.config import load_config
    from mtrec_dist.train.launch import run_training

    run_dir = tmp / tag
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            *base_overrides(a, prepared),
            f"run_dir={run_dir}",
            f"deepspeed={tmp / 'zero2.json'}",
            f"trainer.num_workers={workers}",
            f"trainer.micro_batch={micro or a.micro}",
            *extra,
        ],
    )
    print(f"[bench_scaling] {tag}: {workers} worker(s) {' '.join(extra)}", file=sys.stderr)
    t0 = time.time()
    run_training(cfg)
    wall = time.time() - t0
    recs = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    gb = (micro or a.micro) * workers
    step_wall = [gb / r["throughput/samples_per_s"] for r in recs]
    tail = [r for r in recs if r["step"] > a.warmup]
    first_start = recs[0]["time/unix"] - step_wall[0]
    out = {
        "workers": workers,
        "overrides": extra,
        "micro_batch": micro or a.micro,
        "global_batch": gb,
        "steps": len(recs),
        "step_wall_s": round(
            statistics.median(gb / r["throughput/samples_per_s"] for r in tail), 3
        ),
        "step_cpu_s": round(statistics.median(r["time/cpu_s"] for r in tail), 3),
        "samples_per_s": round(statistics.median(r["throughput/samples_per_s"] for r in tail), 2),
        "startup_s": round(first_start - t0, 1),
        "steps_s": round(t0 + wall - first_start, 1),
        "run_wall_s": round(wall, 1),
    }
    if "titles/encoded" in recs[0]:  # global exchange: what the encoders really ran on
        out["logged_encoded_per_step"] = [int(r["titles/encoded"]) for r in recs]
        out["logged_global_distinct_per_step"] = [int(r["titles/global_distinct"]) for r in recs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepared", required=True, help="prepared folder (train split)")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--layers", type=int, default=2, help="model.encoder_layers")
    ap.add_argument("--history", type=int, default=50)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--project", nargs="*", default=["8x128", "16x16"])
    ap.add_argument("--project-steps", type=int, default=8)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--parallel", action="store_true", help="also 1 worker x 2 threads")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scaling.json"))
    a = ap.parse_args()
    prepared = Path(a.prepared).resolve()
    out: dict = {
        "benchmark": "scaling: data.dedup rank vs global, MTRec vs BERT, Ray start-up; ZeRO-2",
        "encoder": f"{a.encoder}, model.encoder_layers={a.layers}",
        "data": str(prepared),
        "history_len": a.history,
        "steps": a.steps,
        "warmup_steps": a.warmup,
        "projection": {},
        "dedup": {},
    }

    def save() -> None:  # after every section: a run cut short keeps what it measured
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")

    for spec in a.project:
        w, m = (int(x) for x in spec.split("x"))
        print(f"[bench_scaling] id stream {w} x {m}", file=sys.stderr)
        out["projection"][spec] = id_stream(prepared, w, m, a.project_steps, a.history)
    for w in a.workers:
        out["dedup"][f"{w}x{a.micro}"] = {
            "id_stream": id_stream(prepared, w, a.micro, a.steps, a.history)
        }
    if not a.skip_training:
        import ray

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
            ray.init(
                address="local",
                num_cpus=max(a.workers),
                include_dashboard=False,
                log_to_driver=False,
            )
            try:
                for w in a.workers:
                    row = out["dedup"][f"{w}x{a.micro}"]
                    for mode in ("rank", "global"):
                        row[mode] = measure(
                            a, prepared, tmp, f"{mode}{w}", w, [f"data.dedup={mode}"]
                        )
                        save()
                    row["step_cpu_rank_over_global"] = round(
                        row["rank"]["step_cpu_s"] / row["global"]["step_cpu_s"], 3
                    )
                    row["step_wall_rank_over_global"] = round(
                        row["rank"]["step_wall_s"] / row["global"]["step_wall_s"], 3
                    )
                    save()
                two = out["dedup"].get(f"2x{a.micro}", {}).get("global")
                if two is not None:
                    bert = measure(
                        a, prepared, tmp, "bert2", 2, ["model.name=bert", "trainer.surgery=none"]
                    )
                    out["models_2_workers"] = {
                        "mtrec": two,
                        "bert": bert,
                        "step_cpu_mtrec_over_bert": round(
                            two["step_cpu_s"] / bert["step_cpu_s"], 3
                        ),
                        "step_wall_mtrec_over_bert": round(
                            two["step_wall_s"] / bert["step_wall_s"], 3
                        ),
                    }
                if a.parallel:
                    one = measure(a, prepared, tmp, "one", 1, ["trainer.cpus_per_worker=2"])
                    two = measure(a, prepared, tmp, "two", 2, [], micro=a.micro // 2)
                    out["parallel"] = {
                        "one_worker_two_threads": one,
                        "two_workers_same_global_batch": two,
                        "ratio_samples_per_s": round(
                            two["samples_per_s"] / one["samples_per_s"], 3
                        ),
                        "target_ratio": 0.85,
                    }
            finally:
                ray.shutdown()
    save()
    print(json.dumps(out, indent=1)[:6000])


if __name__ == "__main__":
    main()
