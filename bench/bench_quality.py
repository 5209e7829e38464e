"""Learning quality: dev metrics of each model against the planted ceiling, over seeds.

    python bench/bench_quality.py [--out bench/results/quality.json] [--rows mtrec,bert ...]
                                  [--seeds 0 1 2] [--steps 40] [--data DIR] [--work DIR]

The CPU regime (chosen by the measurements in docs/benchmarks.md, "Learning quality: how the
regime was chosen"): the full table, 10 rows x 3 seeds, in under an hour of 2 cores:

* data: synthetic MIND ``small`` (seed 0: 20,000 train / 5,000 dev impressions, 8,000 news,
  planted click model), prepared with titles of 20 word pieces and the 20 most recent clicks;
* encoder: the whole shipped MiniLM-L6-H384 (``--encoder-layers 0``), mean pooling, only its
  top layer trained (``--train-layers 1``) over an exact cache of the five frozen ones
  (``model.train_layers``, docs/design.md §3.1): a step runs one transformer layer;
* training: the single-process reference trainer (``train/local.py``), micro-batch
  ``--batch`` (32) x 1, ``--steps`` (100) optimizer steps, encoder lr ``--encoder-lr`` (2e-5,
  the papers' rate) and ``--lr`` (1e-3) for the user encoder, heads and the learned score scale
  (``model.learned_scale``), 10% warm-up then linear decay, NER loss averaged over a title's
  tokens (``model.ner_reduction=mean``; the ``mtrec ner=sum`` row is eq. 8 as written), seeds
  0..2 (model init, data order, negatives);
* curve: dev AUC on the first ``--eval-impressions`` (500) dev impressions every
  ``--eval-every`` (25) steps; the table on the first ``--final-impressions`` (2,000; 0 = all)
  dev impressions, against the ceilings computed on exactly those impressions.

Rows: the default ones are the eight BERT rows, ``mtrec ner=sum`` and the classic ``nrms`` (its
word embeddings from scratch, the same steps and lr); not ``unbert``: UNBERT is a cross-encoder (each
candidate is encoded together with the whole clicked history, ~400 word pieces), so scoring
even the 500 curve impressions took over 15 minutes on this CPU; run it with ``--rows unbert``.
The classic baselines (``nrms``, ``naml``, ``lstur``, ``npa``) are rows too (``--rows``); they
learn their word embeddings from scratch and want more steps (``--steps 600 --lr 1e-3``).

A run's result is kept in its run folder (``quality_run.json``) and reused when the regime is
the same, so an interrupted benchmark resumes; the seeds loop outside the rows, so a partial
run has every row.

Reported per row (mean ± sample std over seeds): AUC, MRR, nDCG@5, nDCG@10, the fraction of the
ceiling's lift ``(AUC - 0.5) / (ceiling - 0.5)`` and of the content ceiling's (the planted model
without popularity, which no model here can see: ``synthetic.content_logits``); the papers'
orderings (MTRec > w/o GS > BERT; MINER weighted > mean > max) with their gaps and spreads.
Writes the JSON (``--out``), a Markdown table and a learning-curve PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtrec_dist import quality  # noqa: E402
from mtrec_dist.config import load_config  # noqa: E402
from mtrec_dist.metrics import METRICS  # noqa: E402
from mtrec_dist.utils import Progress, atomic_write_json, atomic_write_text  # noqa: E402

MINER = ["model.name=miner", "model.groups.main.disagreement=0.8", "trainer.surgery=none"]
# row -> overrides of configs/demo.yaml-like defaults (model and surgery only).
ROWS: dict[str, list[str]] = {
    "mtrec": ["model.name=mtrec", "trainer.surgery=mtrec"],
    "mtrec w/o GS": ["model.name=mtrec", "trainer.surgery=none"],
    "mtrec aux_only": ["model.name=mtrec", "trainer.surgery=aux_only"],
    "mtrec pcgrad": ["model.name=mtrec", "trainer.surgery=pcgrad"],
    # MTRec eq. 8 as written: the NER loss of a title is the SUM of its token losses.
    "mtrec ner=sum": ["model.name=mtrec", "trainer.surgery=mtrec", "model.ner_reduction=sum"],
    "bert": ["model.name=bert", "trainer.surgery=none"],
    # MINER's objective (eq. 7): main + beta * disagreement, beta = 0.8, in one group.
    "miner max": [*MINER, "model.miner_aggregator=max"],
    "miner mean": [*MINER, "model.miner_aggregator=mean"],
    "miner weighted": [*MINER, "model.miner_aggregator=weighted"],
    "unbert": ["model.name=unbert", "trainer.surgery=none"],
    # The classic baselines (word-piece embeddings; GloVe with data.word_vectors=PATH).
    "nrms": ["model.name=nrms", "trainer.surgery=none"],
    "naml": ["model.name=naml", "trainer.surgery=none"],
    "lstur": ["model.name=lstur", "trainer.surgery=none"],
    "npa": ["model.name=npa", "trainer.surgery=none"],
}
CLASSIC = ("nrms", "naml", "lstur", "npa")  # no BERT: the encoder keys do not apply
DEFAULT_ROWS = [r for r in ROWS if r not in ("unbert", "naml", "lstur", "npa")]
ORDERINGS = (["mtrec", "mtrec w/o GS", "bert"], ["miner weighted", "miner mean", "miner max"])


def ensure_data(data: Path) -> Path:
    from mtrec_dist.data.prepare import prepare
    from mtrec_dist.data.synthetic import generate

    if not (data / "synth.json").is_file():
        generate(data, scale="small", seed=0, progress=False)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={data}"])
    if not (cfg.prepared_dir / "manifest.json").is_file():
        prepare(cfg, progress=False)
    return data


def run_one(a: argparse.Namespace, data: Path, row: str, seed: int) -> dict:
    """One row x seed; its result is kept in the run folder, so an interrupted benchmark
    resumes where it stopped (a result made under another regime is not reused)."""
    run_dir = Path(a.work) / "runs" / f"{row.replace(' ', '_')}_s{seed}"
    done = run_dir / "quality_run.json"
    if done.is_file():
        kept = json.loads(done.read_text())
        if kept.get("regime") == _regime(a):
            return kept
    # configs/demo.yaml trains the top layer of MiniLM: the classic rows have no such encoder
    encoder = ["model.train_layers=0"] if row in CLASSIC else [
        f"model.encoder={a.encoder}",
        f"model.encoder_layers={a.encoder_layers}",
        f"model.train_layers={a.train_layers}",
        f"trainer.encoder_lr={a.encoder_lr}",
        "model.learned_scale=true",
    ]  # fmt: skip
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"data.root={data}",
            f"run_dir={run_dir}",
            f"data.history_len={a.history}",
            f"trainer.micro_batch={a.batch}",
            f"trainer.max_steps={a.steps}",
            "trainer.epochs=1000",  # --steps decides the length, across epochs if needed
            f"trainer.lr={a.lr}",
            f"trainer.seed={seed}",
            "trainer.log_every=0",
            *encoder,
            *a.set,
            *ROWS[row],
        ],
    )
    t0, c0 = time.monotonic(), time.process_time()
    curve = quality.train_curve(cfg, a.eval_every, a.eval_impressions)
    from mtrec_dist.eval.evaluate import evaluate_model
    from mtrec_dist.eval.run_folder import load_run

    model = load_run(run_dir)[0]
    final = evaluate_model(model, cfg.prepared_dir, "dev", a.final_impressions)
    result = {
        "row": row,
        "seed": seed,
        "curve": curve,
        "final": {k: float(final[k]) for k in METRICS},
        "seconds": time.monotonic() - t0,
        "cpu_seconds": time.process_time() - c0,
        "regime": _regime(a),
    }
    atomic_write_json(done, result)
    return result


def _regime(a: argparse.Namespace) -> dict:
    """What a run's result depends on (not where it is written)."""
    return {k: v for k, v in vars(a).items() if k not in ("out", "rows", "seeds", "work")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    ap.add_argument("--data", default="", help="synthetic small data folder (made if missing)")
    ap.add_argument("--work", default="/tmp/mtrec_bench_quality", help="run folders")
    ap.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma list of: {', '.join(ROWS)}"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--encoder-layers", type=int, default=0, help="keep the first N (0 = all)")
    ap.add_argument("--train-layers", type=int, default=1, help="model.train_layers")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--history", type=int, default=20, help="data.history_len")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3, help="trainer.lr (all but the encoder)")
    ap.add_argument("--encoder-lr", type=float, default=2e-5, help="trainer.encoder_lr")
    ap.add_argument("--set", nargs="*", default=[], help="more key=value overrides, every row")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-impressions", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--final-impressions", type=int, default=2000, help="dev impressions of the table (0 = all)"
    )
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; allowed: {', '.join(ROWS)}")
    t_start = time.monotonic()
    data = ensure_data(Path(a.data or Path(a.work) / "data"))
    ceil_curve = quality.ceilings(data, "dev", a.eval_impressions)
    ceil_all = quality.ceilings(data, "dev", a.final_impressions)
    runs: list[dict] = []
    bar = Progress("quality runs", len(rows) * len(a.seeds), unit="runs", every=0.0)
    for seed in a.seeds:  # every row once before any row twice: a partial run covers all rows
        for row in rows:
            r = run_one(a, data, row, seed)
            runs.append(r)
            bar.update(1, extra=f"{row} seed {seed}: dev AUC {r['final']['auc']:.4f}")
    table = []
    for row in rows:
        mine = [r for r in runs if r["row"] == row]
        entry = {"row": row}
        for k in METRICS:
            entry[k] = quality.summarize_runs([r["final"][k] for r in mine])
        entry["lift"] = quality.summarize_runs(
            [quality.lift_fraction(r["final"]["auc"], ceil_all["full"]["auc"]) for r in mine]
        )
        entry["content_lift"] = quality.summarize_runs(
            [quality.lift_fraction(r["final"]["auc"], ceil_all["content"]["auc"]) for r in mine]
        )
        table.append(entry)
    by_row = {e["row"]: e for e in table}
    orderings = [quality.ordering(by_row, o) for o in ORDERINGS if all(n in by_row for n in o)]
    content_curve = ceil_curve["content"]["auc"]
    curves = _mean_curves(runs, rows, content_curve)
    goals = quality.goals(runs, by_row, content_curve)
    out = Path(a.out)
    png = quality.plot_curves(
        curves,
        out.with_suffix(".png"),
        f"dev AUC, fraction of the content ceiling's lift (first {a.eval_impressions} dev "
        f"impressions, mean of {len(a.seeds)} seeds)\nBERT rows: {a.encoder}, top "
        f"{a.train_layers} layer(s) trained over cached lower ones; batch {a.batch}, lr {a.lr}, "
        f"encoder lr {a.encoder_lr}",
        full_ceiling=quality.lift_fraction(ceil_curve["full"]["auc"], content_curve),
    )
    md = quality.markdown_table(table)
    atomic_write_text(out.with_suffix(".md"), md + "\n" + quality.goals_markdown(goals))
    atomic_write_json(
        out,
        {
            "benchmark": "quality",
            "regime": _regime(a),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "ceiling": {"table_impressions": ceil_all, "curve_impressions": ceil_curve},
            "wall_s": time.monotonic() - t_start,
            "run_cpu_s": sum(r["cpu_seconds"] for r in runs),
            "run_wall_s": sum(r["seconds"] for r in runs),
            "table": table,
            "orderings": orderings,
            "goals": goals,
            "runs": runs,
            "png": str(png),
        },
    )
    print(md)
    print(quality.goals_markdown(goals))
    for o in orderings:
        print(
            f"{o['claim']}: {'holds' if o['holds'] else 'does NOT hold'} "
            f"(gaps {', '.join(f'{g:+.4f}' for g in o['gaps'])}; std "
            f"{', '.join(f'{s:.4f}' for s in o['std'])}; beyond noise: {o['beyond_noise']})"
        )
    print(f"wrote {out}, {out.with_suffix('.md')}, {png}")
    return 0


def _mean_curves(runs: list[dict], rows: list[str], ceiling_auc: float) -> dict:
    """Row -> [(step, mean lift fraction over seeds)] on the curve impressions (the content
    ceiling's lift when ``ceiling_auc`` is the content ceiling)."""
    out = {}
    for row in rows:
        pts: dict[int, list[float]] = {}
        for r in runs:
            if r["row"] == row:
                for p in r["curve"]:
                    pts.setdefault(p["step"], []).append(
                        quality.lift_fraction(p["auc"], ceiling_auc)
                    )
        out[row] = [(s, sum(v) / len(v)) for s, v in sorted(pts.items())]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
