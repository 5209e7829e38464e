"""The quality benchmark's pieces: lift fraction, ceilings, curve file, table, orderings, and
that a few steps on planted data learn (main loss below chance)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mtrec_dist import quality

REPO = Path(__file__).resolve().parents[2]


def test_lift_fraction_by_hand():
    assert quality.lift_fraction(0.65, 0.8) == pytest.approx(0.5, abs=1e-15)
    assert quality.lift_fraction(0.5, 0.8) == 0.0
    assert quality.lift_fraction(0.8, 0.8) == 1.0
    assert quality.lift_fraction(0.45, 0.75) == pytest.approx(-0.2, abs=1e-15)
    with pytest.raises(ValueError, match="not above chance"):
        quality.lift_fraction(0.6, 0.5)


def test_full_ceiling_equals_the_generators_own(tiny_data):
    """Recomputed from truth/dev_probs.tsv with metrics.py: the generator's ceiling."""
    synth = json.loads((tiny_data / "synth.json").read_text())
    got = quality.ceilings(tiny_data, "dev")["full"]
    for k in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert got[k] == pytest.approx(synth["ceiling"]["dev"][k], abs=1e-12), k


def test_content_ceiling_removes_a_per_news_term_only(tiny_data):
    """logit(true p) - content logit is the popularity term: one value per news, whatever the
    user (checked across every impression in which a news appears)."""
    from mtrec_dist.data import mind

    probs = dict(quality._true_probs(tiny_data, "dev"))
    content = dict(
        __import__("mtrec_dist.data.synthetic", fromlist=["x"]).content_logits(tiny_data, "dev")
    )
    per_news: dict[str, list[float]] = {}
    for imp in mind.iter_behaviors(tiny_data / "dev" / "behaviors.tsv"):
        p = probs[imp.impression_id]
        diff = np.log(p / (1 - p)) - content[imp.impression_id]
        for n, d in zip(imp.candidates, diff):
            per_news.setdefault(n, []).append(float(d))
    repeated = [v for v in per_news.values() if len(v) > 1]
    assert len(repeated) > 20
    # p is quantised to 1e-7, so the recovered logit carries up to ~1e-4 of rounding
    assert max(max(v) - min(v) for v in repeated) < 2e-3
    spread = np.std([v[0] for v in per_news.values()])
    assert spread > 0.1  # the removed term is not a constant: popularity differs by news
    c = quality.ceilings(tiny_data, "dev")
    assert 0.5 < c["content"]["auc"] < c["full"]["auc"]


def test_ceiling_on_the_first_impressions_matches_sklearn(tiny_data):
    """sklearn's AUC of the submission's ranks (a stable descending sort: tied candidates
    ranked in candidate order), the evaluator's tie rule, on the first 30 impressions."""
    from sklearn.metrics import roc_auc_score

    from mtrec_dist.data import mind

    imps = list(mind.iter_behaviors(tiny_data / "dev" / "behaviors.tsv"))[:30]
    probs = dict(quality._true_probs(tiny_data, "dev"))
    aucs = []
    for i in imps:
        p = probs[i.impression_id]
        order = sorted(range(len(p)), key=lambda j: -p[j])  # Python's sort is stable
        rank = {j: r for r, j in enumerate(order)}
        if 0 < sum(i.labels) < len(i.labels):
            aucs.append(roc_auc_score(i.labels, [-rank[j] for j in range(len(p))]))
    got = quality.ceilings(tiny_data, "dev", max_impressions=30)["full"]["auc"]
    assert got == pytest.approx(float(np.mean(aucs)), abs=1e-12)


def test_curve_png_written(tmp_path):
    import matplotlib.image as mpimg

    path = quality.plot_curves(
        {"a": [(0, 0.0), (10, 0.4)], "b": [(0, 0.05), (10, 0.2)]}, tmp_path / "c.png", "t"
    )
    assert path == tmp_path / "c.png" and path.is_file()
    assert mpimg.imread(path).shape[:2] == (480, 800)  # 8 x 4.8 inches at 100 dpi
    assert not list(tmp_path.glob("*.tmp.png"))


def test_summary_table_and_orderings_by_hand():
    s = quality.summarize_runs([0.6, 0.7, 0.8])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.1)
    assert (s["min"], s["max"], s["n"]) == (0.6, 0.8, 3)
    one = quality.summarize_runs([0.5])
    row = {"row": "x", "auc": one, "mrr": one, "ndcg@5": one, "ndcg@10": one}
    row |= {"lift": quality.summarize_runs([0.25]), "content_lift": quality.summarize_runs([0.5])}
    md = quality.markdown_table([row]).splitlines()
    assert md[2] == (
        "| x | 50.0 ± 0.0 | 25.0 ± 0.0 | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 "
        "| 0.5000 ± 0.0000 | 1 |"
    )
    rows = {
        "a": {"auc": {"mean": 0.70, "std": 0.01}},
        "b": {"auc": {"mean": 0.68, "std": 0.01}},
        "c": {"auc": {"mean": 0.69, "std": 0.01}},
    }
    o = quality.ordering(rows, ["a", "b", "c"])
    assert o["holds"] is False
    assert o["gaps"] == pytest.approx([0.02, -0.01])
    o = quality.ordering(rows, ["a", "c", "b"])
    assert o["holds"] is True and o["beyond_noise"] is False  # 0.01 < hypot(0.01, 0.01)


@pytest.mark.parametrize(
    "regime",
    [
        # the benchmark's and the demo's regime: top layer over the cached lower one, two
        # learning rates (one tiny end-to-end run; the whole-encoder run cost 40 s of the suite)
        (
            "model.train_layers=1",
            "model.learned_scale=true",
            "trainer.lr=1e-3",
            "trainer.encoder_lr=1e-4",
        ),
    ],
    ids=["top-layer-cached"],
)
def test_a_few_steps_on_planted_data_beat_chance(tiny_cfg, regime):
    """MTRec on MiniLM's first 2 layers (scaled scores, so it starts at chance rather than
    above it), the tiny planted data, fixed seed: 40 steps take the main loss below chance,
    ln(1 + 4)."""
    from mtrec_dist.train.local import train_local

    cfg = tiny_cfg(
        "model.encoder=minilm",
        "model.encoder_layers=2",
        "model.scaled_scores=true",
        "model.dropout=0",
        "trainer.max_steps=40",
        "trainer.log_every=0",
        *regime,
    )
    train_local(cfg)
    recs = [json.loads(x) for x in (Path(cfg.run_dir) / "train_log.jsonl").read_text().splitlines()]
    main = [r["loss/main"] for r in recs]
    assert len(main) == 40
    chance = math.log(5)
    assert np.mean(main[-10:]) < chance - 0.01
    assert np.mean(main[-10:]) < np.mean(main[:5])


def test_train_curve_points_and_the_untrained_model(tiny_cfg):
    """Points at step 0, every 2 steps and the last; step 0 is the seeded untrained model,
    scored here by the evaluator on a model built independently."""
    import torch

    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.eval.evaluate import evaluate_model
    from mtrec_dist.models.registry import build_model

    cfg = tiny_cfg("trainer.max_steps=5", "trainer.log_every=0", "model.dropout=0")
    curve = quality.train_curve(cfg, eval_every=2, eval_impressions=30)
    assert [p["step"] for p in curve] == [0, 2, 4, 5]
    torch.manual_seed(cfg.trainer.seed)
    fresh = build_model(cfg, load_manifest(cfg.prepared_dir)).eval()
    with torch.no_grad():
        ref = evaluate_model(fresh, cfg.prepared_dir, "dev", 30)
    assert curve[0]["auc"] == pytest.approx(ref["auc"], abs=1e-12)
    assert curve[0]["mrr"] == pytest.approx(ref["mrr"], abs=1e-12)
    assert curve[-1]["auc"] != curve[0]["auc"]  # the last point scores the trained model


def _run(row, curve_aucs):
    return {"row": row, "curve": [{"step": 10 * i, "auc": a} for i, a in enumerate(curve_aucs)]}


def test_goals_by_hand():
    """Curves averaged over seeds, flatness of the last two points, ends vs step 0, and the
    three checks against their thresholds, each computed by hand."""
    runs = [
        _run("mtrec", [0.56, 0.60, 0.64]),
        _run("mtrec", [0.58, 0.62, 0.66]),  # mean: 0.57, 0.61, 0.65
        _run("nrms", [0.50, 0.55, 0.60]),  # last change 0.05: not flat
        _run("bert", [0.57, 0.56, 0.565]),  # ends below its step 0
    ]
    rows = {
        "mtrec": {"auc": {"mean": 0.64}, "content_lift": {"mean": 0.61}},
        "nrms": {"auc": {"mean": 0.60}, "content_lift": {"mean": 0.40}},
        "bert": {"auc": {"mean": 0.56}, "content_lift": {"mean": 0.25}},
    }
    g = quality.goals(runs, rows, content_auc=0.75)
    m = g["rows"]["mtrec"]
    assert m["step0_auc"] == pytest.approx(0.57) and m["last_auc"] == pytest.approx(0.65)
    assert m["last_step_change"] == pytest.approx(0.04) and m["flat"] is False
    assert m["gain_over_step0"] == pytest.approx(0.08) and m["ends_above_step0"] is True
    assert m["content_lift_curve"][-1][1] == pytest.approx((0.65 - 0.5) / 0.25)
    assert g["rows"]["bert"]["flat"] is True and g["rows"]["bert"]["ends_above_step0"] is False
    assert g["all_rows_flat"] is False and g["no_row_below_step0"] is False
    checks = {c["goal"]: (c["value"], c["met"]) for c in g["checks"]}
    assert checks["MTRec fraction of the content lift"] == (pytest.approx(0.61), True)
    assert checks["MTRec AUC above its untrained model"] == (pytest.approx(0.08), True)
    assert checks["MTRec AUC above classic NRMS"] == (pytest.approx(0.04), True)
    md = quality.goals_markdown(g)
    assert "| MTRec AUC above classic NRMS | +0.0400 | 0.03 | yes |" in md
    assert "| bert | 0.5700 | 0.5650 | +0.0050 | yes | NO |" in md
