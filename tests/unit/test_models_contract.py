"""The model contract (models/base.py): every registered model derives from it and declares
the capabilities the registry, trainers and evaluator read; the tasks it declares are the
losses it returns; its fast scorer (where it has one) gives model(batch)'s scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtrec_dist.config import ModelConfig
from mtrec_dist.data.batch import collate
from mtrec_dist.eval.engine import news_batch
from mtrec_dist.models.base import NewsRecModel
from mtrec_dist.models.registry import MODELS
from mtrec_dist.tasks import ALL_TASKS, SWITCHABLE_TASKS
from tests.unit.titles import sample, title_table

MTREC_TASKS = ("main", "category", "ner", "sentiment")
BI = dict(cross_encoder=False, needs_users=False, multi_field=False)
BERT_BI = dict(BI, global_dedup=True, per_title_encoder=True)
CLASSIC_BI = dict(BI, global_dedup=False, per_title_encoder=False, supported_tasks=("main",))
EXPECTED = {  # written out by hand: the capabilities each paper's model has
    "mtrec": dict(BERT_BI, supported_tasks=MTREC_TASKS),
    "bert": dict(BERT_BI, supported_tasks=("main",)),
    "mtrec_amf": dict(BERT_BI, multi_field=True, supported_tasks=MTREC_TASKS),
    "bert_amf": dict(BERT_BI, multi_field=True, supported_tasks=("main",)),
    "nrms_bert": dict(BERT_BI, supported_tasks=("main",)),
    "lstur_bert": dict(BERT_BI, supported_tasks=("main",)),
    "miner": dict(BERT_BI, supported_tasks=("main", "disagreement")),
    "unbert": dict(
        cross_encoder=True,
        needs_users=False,
        multi_field=False,
        global_dedup=False,
        per_title_encoder=False,
        supported_tasks=("main",),
    ),
    "nrms": CLASSIC_BI,
    "naml": CLASSIC_BI,
    "lstur": dict(CLASSIC_BI, needs_users=True),
    "stur": CLASSIC_BI,
    "npa": dict(CLASSIC_BI, cross_encoder=True, needs_users=True),
}
PRETRAINED = {
    "mtrec",
    "bert",
    "mtrec_amf",
    "bert_amf",
    "nrms_bert",
    "lstur_bert",
    "miner",
    "unbert",
}
FACTORED = {"mtrec", "bert", "mtrec_amf", "bert_amf"}  # additive attention + dot product

# news rows 1..9 (0 = the empty title); categories 0..3
TITLES = [[], [2000, 2001], [2002], [2003, 2004, 2005], [2006], [2007, 2008], [2009], [2010]]
TITLES += [[2011, 2012, 2013, 2014], [2015]]
CATEGORY = [0, 1, 2, 1, 3, 2, 0, 1, 3, 2]
META = {
    "count": len(TITLES),
    "has_sentiment": True,
    "vocab": {"category": 4, "subcategory": 1, "entities": 2, "users": 3},
}
SMALL = dict(  # the classic models' layers at test size
    word_dim=6, cnn_filters=4, nrms_heads=2, nrms_head_dim=3, query_dim=5, npa_user_dim=3
)
SAMPLES = [
    sample([1, 2, 3], [4, 5, 1]),
    sample([5, 3, 3, 6], [2, 6, 3, 8]),
    sample([], [7, 9]),  # no history: every score 0
    sample([9, 8, 7, 1, 2], [3, 4, 5, 6, 7]),
]


def _model(name: str) -> NewsRecModel:
    torch.manual_seed(0)
    tasks = dict.fromkeys(SWITCHABLE_TASKS, True)
    cfg = ModelConfig(name=name, encoder="tiny", tasks=tasks, miner_k=2, **SMALL)
    model = MODELS[name](cfg, META)
    with torch.no_grad():  # tiny random BERT vectors are near zero: make scores differ
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def test_every_registered_model_declares_the_contract():
    for name, cls in MODELS.items():
        assert issubclass(cls, NewsRecModel), name
        declared = {k: getattr(cls, k) for k in EXPECTED[name]}
        assert declared == EXPECTED[name], name
        assert set(cls.supported_tasks) <= set(ALL_TASKS), name
    assert [n for n, c in MODELS.items() if c.cross_encoder] == ["unbert", "npa"]
    assert [n for n, c in MODELS.items() if c.needs_users] == ["lstur", "npa"]


@pytest.mark.parametrize("name", list(MODELS))
def test_declared_tasks_are_the_losses_with_every_task_on(name):
    model = _model(name)
    with torch.no_grad():
        out = model(collate(SAMPLES, title_table(TITLES, CATEGORY)))
    assert sorted(out.losses) == sorted(model.supported_tasks)
    assert (model.pretrained_encoder() is not None) == (name in PRETRAINED)


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_scorer_equals_the_model_scores(name):
    """The model's own fast scorer (MTRec's factored attention) == model(batch).scores on the
    same impressions; every other model has none and keeps the batched path."""
    model = _model(name)
    table = title_table(TITLES, CATEGORY)
    if model.cross_encoder:
        assert model.fast_scorer(np.zeros((len(TITLES), 4), dtype=np.float32)) is None
        return
    with torch.no_grad():
        vectors = model.encode_news(news_batch(table, np.arange(len(TITLES)))).numpy()
        batch = collate(SAMPLES, table)
        want = model(batch).scores[batch.cand_mask].numpy()
    scorer = model.fast_scorer(vectors)
    assert (scorer is not None) == (name in FACTORED)
    if scorer is None:
        return
    hist = [s.hist for s in SAMPLES]
    cand = [s.cand for s in SAMPLES]
    got = scorer.scores(
        np.concatenate(hist), [len(h) for h in hist], np.concatenate(cand), [len(c) for c in cand]
    )
    assert np.abs(want).max() > 0.1  # not comparing zeros
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not got[7:9].any()  # the history-less impression (after 3 + 4 candidates) scores 0
