"""For `mtrec demo` and bench/bench_quality.py: learning curves against the planted ceiling.

The synthetic data (``mtrec_dist.data.synthetic``) knows every candidate's true click
probability, so the best achievable dev AUC (the *ceiling*) is known, and a model is read as the
**fraction of the ceiling's lift**: ``(AUC - 0.5) / (ceiling AUC - 0.5)`` (0 = chance, 1 = the
planted model itself). The same fraction is also given against the *content ceiling*: the
planted model without its popularity term, which only click counts reveal and no model here
reads (``synthetic.content_logits``).

Pieces, each small and tested on its own: :func:`lift_fraction`, :func:`ceilings` (metrics of
the true probabilities on exactly the impressions a curve point is evaluated on),
:func:`train_curve` (the single-process reference trainer with dev metrics every few steps),
:func:`plot_curves` and :func:`markdown_table`. ``bench/bench_quality.py`` runs the table.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from mtrec_dist.config import Config
from mtrec_dist.data import mind
from mtrec_dist.data.prepared import load_manifest
from mtrec_dist.data.synthetic import content_logits
from mtrec_dist.eval.evaluate import evaluate_model
from mtrec_dist.metrics import METRICS, ranked_metrics
from mtrec_dist.train.local import train_local
from mtrec_dist.train.steps import step_plan


def lift_fraction(auc: float, ceiling_auc: float) -> float:
    """(auc - 0.5) / (ceiling_auc - 0.5): the share of the achievable lift over chance."""
    if not ceiling_auc > 0.5:
        raise ValueError(f"ceiling AUC {ceiling_auc} is not above chance (0.5): no lift to share")
    return (auc - 0.5) / (ceiling_auc - 0.5)


def _true_probs(root: Path, split: str) -> Iterable[tuple[str, np.ndarray]]:
    """``(impression id, true click probabilities)`` from ``truth/<split>_probs.tsv``."""
    path = root / "truth" / f"{split}_probs.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the ceiling needs data from `mtrec synth`")
    with open(path, encoding="utf-8") as f:
        for line in f:
            imp, probs = line.rstrip("\n").split("\t")
            yield imp, np.array([float(x) for x in probs.split(",")])


def ceilings(root: str | Path, split: str = "dev", max_impressions: int = 0) -> dict[str, dict]:
    """Metrics of the planted model (``full``) and of its content part (``content``) on the
    first ``max_impressions`` impressions of ``split`` (0 = all), file order: the impressions
    ``evaluate_model(..., max_impressions)`` scores, so a curve point and its ceiling agree."""

    root = Path(root)
    limit = max_impressions if max_impressions > 0 else None
    imps = list(itertools.islice(mind.iter_behaviors(root / split / "behaviors.tsv"), limit))
    labels = [imp.labels for imp in imps]
    out = {}
    for name, scores in (
        ("full", itertools.islice(_true_probs(root, split), limit)),
        ("content", itertools.islice(content_logits(root, split), limit)),
    ):
        pairs = list(scores)
        ids = [i for i, _ in pairs]
        if ids != [imp.impression_id for imp in imps]:
            raise ValueError(f"{root}: truth and behaviors of split {split!r} disagree on ids")
        sizes = np.array([len(y) for y in labels], dtype=np.int64)
        flat_y = np.concatenate([np.asarray(y, dtype=np.float64) for y in labels])
        flat_s = np.concatenate([np.asarray(s, dtype=np.float64) for _, s in pairs])
        out[name] = ranked_metrics(flat_y, flat_s, sizes)  # the evaluator's tie rule
    return out


def train_curve(cfg: Config, eval_every: int, eval_impressions: int) -> list[dict]:
    """Train ``cfg`` with the single-process reference trainer; dev metrics (first
    ``eval_impressions`` impressions) at step 0, every ``eval_every`` steps and at the end."""

    n = step_plan(load_manifest(cfg.prepared_dir), 1, cfg.trainer).total_steps
    curve: list[dict] = []

    def on_step(step: int, model: torch.nn.Module) -> None:  # step 0 = the untrained model
        if step % eval_every == 0 or step == n:
            model.eval()
            with torch.no_grad():
                m = evaluate_model(model, cfg.prepared_dir, "dev", eval_impressions)
            curve.append({"step": step, **{k: float(m[k]) for k in METRICS}})

    result = train_local(cfg, progress=False, on_step=on_step)
    if curve[-1]["step"] != result["steps"]:
        raise RuntimeError(f"trained {result['steps']} of {n} steps; the last point is missing")
    return curve


def summarize_runs(values: list[float]) -> dict:
    """Mean and spread (sample standard deviation, min, max) over seeds."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def plot_curves(
    curves: dict[str, list[tuple[int, float]]],
    path: str | Path,
    title: str,
    full_ceiling: float | None = None,
) -> Path:
    """One line per model: the fraction of the content ceiling's lift (y) against optimizer
    steps (x); the content ceiling at 1 and, when given, the full ceiling at ``full_ceiling``
    (its lift in the same unit). PNG written atomically."""
    import matplotlib  # lazy: only the benchmark plots, pyplot after use("Agg")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after use("Agg")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, pts in curves.items():
        xs, ys = zip(*pts) if pts else ((), ())
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="content ceiling")
    if full_ceiling is not None:
        ax.axhline(full_ceiling, color="black", lw=0.8, ls=":", label="full ceiling")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("fraction of the content ceiling's lift")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def markdown_table(rows: list[dict]) -> str:
    """Rows of ``{"row", "auc", "mrr", "ndcg@5", "ndcg@10", "lift", "content_lift"}``, each
    value a :func:`summarize_runs` dict, as a Markdown table of mean ± std (n seeds)."""

    def cell(d: dict, pct: bool = False) -> str:
        k = 100.0 if pct else 1.0
        fmt = "{:.1f}" if pct else "{:.4f}"
        return f"{fmt.format(d['mean'] * k)} ± {fmt.format(d['std'] * k)}"

    head = "| row | % of content lift | % of lift | AUC | MRR | nDCG@5 | nDCG@10 | seeds |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['row']} | {cell(r['content_lift'], True)} | {cell(r['lift'], True)} | "
            f"{cell(r['auc'])} | {cell(r['mrr'])} | {cell(r['ndcg@5'])} | {cell(r['ndcg@10'])} "
            f"| {r['auc']['n']} |"
        )
    return "\n".join(lines) + "\n"


def ordering(rows: dict[str, dict], names: list[str]) -> dict:
    """Does mean AUC follow ``names`` in decreasing order? With each gap and the seed spread,
    so a reader can tell an ordering from noise."""
    means = [rows[n]["auc"]["mean"] for n in names]
    stds = [rows[n]["auc"]["std"] for n in names]
    gaps = [a - b for a, b in zip(means, means[1:])]
    return {
        "claim": " > ".join(names),
        "holds": all(g > 0 for g in gaps),
        "gaps": gaps,
        "std": stds,
        "beyond_noise": all(g > math.hypot(s1, s2) for g, s1, s2 in zip(gaps, stds, stds[1:])),
    }


def mean_curve(runs: list[dict], row: str) -> list[tuple[int, float]]:
    """[(step, mean dev AUC over the row's seeds)] on the curve impressions."""
    pts: dict[int, list[float]] = {}
    for r in runs:
        if r["row"] == row:
            for p in r["curve"]:
                pts.setdefault(p["step"], []).append(p["auc"])
    return [(s, statistics.fmean(v)) for s, v in sorted(pts.items())]


# The learning-quality goals (README "Learning quality"): thresholds in one place.
FLAT_AUC = 0.01  # the last two curve points of every row within this
MTREC_CONTENT_LIFT = 0.60
MTREC_OVER_NRMS = 0.03
MTREC_OVER_UNTRAINED = 0.05


def goals(runs: list[dict], rows: dict[str, dict], content_auc: float) -> dict:
    """Each goal with its measured value and whether it is met, from the runs' curves (mean
    over seeds, the curve impressions, whose content ceiling is ``content_auc``) and the table
    rows (``rows[name]["auc"|"content_lift"]`` summaries)."""
    per_row = {}
    for name in rows:
        c = mean_curve(runs, name)
        first, last = c[0][1], c[-1][1]
        prev = c[-2][1] if len(c) > 1 else first
        per_row[name] = {
            "step0_auc": first,
            "last_auc": last,
            "last_step_change": last - prev,
            "flat": abs(last - prev) <= FLAT_AUC,
            "gain_over_step0": last - first,
            "ends_above_step0": last >= first,
            "content_lift_curve": [(s, lift_fraction(v, content_auc)) for s, v in c],
        }
    out: dict = {"rows": per_row, "checks": []}

    def check(name: str, value: float, target: float) -> None:
        out["checks"].append(
            {"goal": name, "value": value, "target": target, "met": value >= target}
        )

    if "mtrec" in rows:
        check(
            "MTRec fraction of the content lift",
            rows["mtrec"]["content_lift"]["mean"],
            MTREC_CONTENT_LIFT,
        )
        check(
            "MTRec AUC above its untrained model",
            per_row["mtrec"]["gain_over_step0"],
            MTREC_OVER_UNTRAINED,
        )
        if "nrms" in rows:
            gap = rows["mtrec"]["auc"]["mean"] - rows["nrms"]["auc"]["mean"]
            check("MTRec AUC above classic NRMS", gap, MTREC_OVER_NRMS)
    out["all_rows_flat"] = all(r["flat"] for r in per_row.values())
    out["no_row_below_step0"] = all(r["ends_above_step0"] for r in per_row.values())
    return out


def goals_markdown(g: dict) -> str:
    """The goals as a Markdown table plus one line per row curve (flat? above step 0?)."""
    lines = ["| goal | measured | target | met |", "|---|---|---|---|"]
    for c in g["checks"]:
        lines.append(
            f"| {c['goal']} | {c['value']:+.4f} | {c['target']:.2f} | {'yes' if c['met'] else 'NO'} |"
        )
    lines += ["", "| row | step-0 AUC | last AUC | last change | flat (<= 0.01) | above step 0 |"]
    lines.append("|---|---|---|---|---|---|")
    for name, r in g["rows"].items():
        lines.append(
            f"| {name} | {r['step0_auc']:.4f} | {r['last_auc']:.4f} | {r['last_step_change']:+.4f} "
            f"| {'yes' if r['flat'] else 'NO'} | {'yes' if r['ends_above_step0'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"
