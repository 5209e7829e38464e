"""Synthetic MIND: byte determinism, MIND format validity, and the planted ceiling recomputed
independently (sklearn AUC; MIND's reference MRR/nDCG written out per impression here)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mtrec_dist.config import ConfigError
from mtrec_dist.data import mind, synthetic
from mtrec_dist.utils import sha256_file

FILES = [*synthetic.FILES, "synth.json"]  # every file generate() writes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    info = synthetic.generate(out, scale="tiny", seed=0, progress=False)
    return out, info


def _hashes(root: Path) -> dict[str, str]:
    return {f: sha256_file(root / f) for f in FILES}


def _read_probs(path: Path) -> dict[str, list[float]]:
    out = {}
    for line in path.read_text().splitlines():
        imp, ps = line.split("\t")
        out[imp] = [float(x) for x in ps.split(",")]
    return out


# ---- MIND's reference scorer, per impression (evaluate.py of the MIND competition)
def _mrr(y: np.ndarray, s: np.ndarray) -> float:
    order = np.argsort(-s, kind="stable")
    yt = y[order]
    return float(np.sum(yt / (np.arange(len(yt)) + 1)) / np.sum(yt))


def _dcg(y: np.ndarray, s: np.ndarray, k: int) -> float:
    order = np.argsort(-s, kind="stable")
    yt = y[order[:k]]
    return float(np.sum((2.0**yt - 1) / np.log2(np.arange(len(yt)) + 2)))


def _ndcg(y: np.ndarray, s: np.ndarray, k: int) -> float:
    return _dcg(y, s, k) / _dcg(y, y.astype(float), k)


def _submission_scores(probs: list[float]) -> np.ndarray:
    """-rank of each candidate, ranks as prediction.txt carries them: by descending probability,
    a tie ranked in candidate order (Python's stable sort, independent of the metric code)."""
    order = sorted(range(len(probs)), key=lambda j: -probs[j])
    rank = np.empty(len(probs))
    rank[order] = np.arange(1, len(probs) + 1)
    return -rank


def _reference_metrics(labels: dict, probs: dict) -> dict:
    """MIND's scorer on the ranks a submission of the true probabilities would carry."""
    aucs, mrrs, n5, n10, skipped = [], [], [], [], 0
    for imp, y in labels.items():
        y, s = np.array(y), _submission_scores(probs[imp])
        assert len(y) == len(s)
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, s))
        else:
            skipped += 1
        mrrs.append(_mrr(y, s))
        n5.append(_ndcg(y, s, 5))
        n10.append(_ndcg(y, s, 10))
    return {
        "auc": float(np.mean(aucs)),
        "mrr": float(np.mean(mrrs)),
        "ndcg@5": float(np.mean(n5)),
        "ndcg@10": float(np.mean(n10)),
        "auc_skipped_all_same_label": skipped,
    }


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    root, _ = tiny
    again = tmp_path / "again"
    synthetic.generate(again, scale="tiny", seed=0, progress=False)
    assert _hashes(again) == _hashes(root)
    other = tmp_path / "other"
    synthetic.generate(other, scale="tiny", seed=1, progress=False)
    h0, h1 = _hashes(root), _hashes(other)
    assert all(h0[f] != h1[f] for f in FILES)


def test_files_are_valid_mind(tiny):
    root, info = tiny
    assert json.loads((root / "synth.json").read_text()) == info
    news_by_split = {}
    for split in ("train", "dev", "test"):
        news = mind.read_news(root / split / "news.tsv")
        ids = {n.news_id for n in news}
        news_by_split[split] = ids
        assert len(news) == info["counts"][split]["news"]
        n_ent = 0
        for n in news:
            assert n.title and n.abstract and n.category and n.subcategory
            assert n.abstract_entities == []
            for e in n.title_entities:
                assert e.type in ("P", "O", "G") and e.wikidata_id.startswith("Q")
                for off, sf in zip(e.offsets, e.surface_forms, strict=True):
                    assert n.title[off : off + len(sf)] == sf
                    n_ent += 1
        assert n_ent > 0
        imps = list(mind.iter_behaviors(root / split / "behaviors.tsv"))
        assert len(imps) == info["counts"][split]["impressions"]
        assert [i.impression_id for i in imps] == [str(k) for k in range(1, len(imps) + 1)]
        times = [i.time for i in imps]
        assert times == sorted(times)
        for imp in imps:
            assert set(imp.history) <= ids and set(imp.candidates) <= ids
            assert len(set(imp.candidates)) == len(imp.candidates)
            assert synthetic.MIN_CAND // 2 <= len(imp.candidates) <= synthetic.MAX_CAND
            if split == "test":
                assert imp.labels is None
            else:
                assert imp.labels is not None and sum(imp.labels) >= 1
        # every news of news.tsv is referenced by the split's behaviors (MIND's layout)
        used = {n for i in imps for n in itertools.chain(i.history, i.candidates)}
        assert used == ids
    raw = (root / "test/behaviors.tsv").read_text().splitlines()
    assert all("-" not in line.split("\t")[4] for line in raw)
    # test truth aligns with the test behaviors, candidate for candidate
    test_imps = list(mind.iter_behaviors(root / "test/behaviors.tsv"))
    truth = [
        line.split(" ", 1) for line in (root / "truth/test_truth.txt").read_text().splitlines()
    ]
    probs = _read_probs(root / "truth/test_probs.tsv")
    assert [t[0] for t in truth] == [i.impression_id for i in test_imps] == list(probs)
    for (imp_id, labs), imp in zip(truth, test_imps):
        y = json.loads(labs)
        assert len(y) == len(imp.candidates) == len(probs[imp_id]) and sum(y) >= 1


def test_planted_model_ceiling_recomputed(tiny):
    root, info = tiny
    dev = list(mind.iter_behaviors(root / "dev/behaviors.tsv"))
    dev_labels = {i.impression_id: i.labels for i in dev}
    got = _reference_metrics(dev_labels, _read_probs(root / "truth/dev_probs.tsv"))
    ceil = info["ceiling"]["dev"]
    for k in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert ceil[k] == pytest.approx(got[k], abs=1e-9), k
    assert ceil["auc_skipped_all_same_label"] == got["auc_skipped_all_same_label"]
    assert 0.7 < ceil["auc"] < 0.9

    test_labels = {}
    for line in (root / "truth/test_truth.txt").read_text().splitlines():
        imp, labs = line.split(" ", 1)
        test_labels[imp] = json.loads(labs)
    got = _reference_metrics(test_labels, _read_probs(root / "truth/test_probs.tsv"))
    for k in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert info["ceiling"]["test"][k] == pytest.approx(got[k], abs=1e-9), k

    train = list(mind.iter_behaviors(root / "train/behaviors.tsv"))
    clicks = sum(sum(i.labels) for i in train)
    cands = sum(len(i.labels) for i in train)
    assert 0.02 <= clicks / cands <= 0.08
    assert info["counts"]["train"]["ctr"] == clicks / cands

    train_news = {n.news_id for n in mind.read_news(root / "train/news.tsv")}
    dev_cands = [c for i in dev for c in i.candidates]
    cold = sum(c not in train_news for c in dev_cands) / len(dev_cands)
    assert 0.10 <= cold <= 0.30
    assert info["counts"]["dev"]["cold_start_share_vs_train"] == pytest.approx(cold, abs=1e-12)


def test_ceiling_has_ties_and_follows_the_submission_tie_rule(tiny):
    """Quantized probabilities tie; where a tie spans a click and a non-click, the ceiling's
    AUC is the submission's (tie ranked in candidate order), not raw-score AUC (tie = 1/2)."""
    root, info = tiny
    dev = {i.impression_id: i.labels for i in mind.iter_behaviors(root / "dev/behaviors.tsv")}
    probs = _read_probs(root / "truth/dev_probs.tsv")
    spans = []  # impressions where some tied group holds a click and a non-click
    for imp, p in probs.items():
        y, p = np.array(dev[imp]), np.array(p)
        if any(0 < y[p == v].sum() < (p == v).sum() for v in set(p.tolist())):
            spans.append(imp)
    assert spans  # the tie rule matters on this data
    for imp in spans:
        raw = roc_auc_score(dev[imp], probs[imp])
        assert roc_auc_score(dev[imp], _submission_scores(probs[imp])) != raw
    ranked_auc = _reference_metrics(dev, probs)["auc"]
    raw_auc = np.mean([roc_auc_score(y, probs[i]) for i, y in dev.items() if 0 < sum(y) < len(y)])
    assert info["ceiling"]["dev"]["auc"] == pytest.approx(ranked_auc, abs=1e-12)
    assert info["ceiling"]["dev"]["auc"] != pytest.approx(raw_auc, abs=1e-12)


def test_label_sampler_is_bernoulli_conditioned_on_a_click():
    p = np.array([0.2, 0.5, 0.1])
    n = 200_000
    ptr = np.arange(n + 1) * 3
    labs = synthetic._sample_labels(np.random.default_rng(0), ptr, np.tile(p, n)).reshape(n, 3)
    p_any = 1 - np.prod(1 - p)
    codes = labs @ np.array([4, 2, 1])
    freq = np.bincount(codes, minlength=8) / n
    assert freq[0] == 0.0
    for code in range(1, 8):
        y = np.array([(code >> 2) & 1, (code >> 1) & 1, code & 1])
        exact = np.prod(np.where(y == 1, p, 1 - p)) / p_any
        assert freq[code] == pytest.approx(exact, abs=4 * np.sqrt(exact / n) + 1e-4)


def test_bad_scale_or_seed_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="scale: expected one of"):
        synthetic.generate(tmp_path, scale="huge")
    with pytest.raises(ConfigError, match="seed"):
        synthetic.generate(tmp_path, scale="tiny", seed=-1)
