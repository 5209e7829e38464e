"""The one impression type (docs/design.md §2): slicing, gathering and joining its columns equal
hand-built references, and shard -> Impressions -> collate (evaluation and training) gives the
batches built the per-sample way, by hand, from the raw arrays written to the shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtrec_dist.data.batch import NewsTable, collate
from mtrec_dist.data.impressions import Impressions, Sample
from mtrec_dist.data.stream import epoch_plan, eval_groups, train_loader
from tests.unit.test_stream import build_prepared, make_impressions

# --------------------------------------------------------------------------- references


def _rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` random impressions as plain per-impression lists."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = int(rng.integers(0, 5))
        out.append(
            {
                "id": f"{i * 7:03d}" if i % 3 else f"x{i}",
                "hist": rng.integers(1, 50, int(rng.integers(0, 6))).tolist(),
                "cand": rng.integers(0, 50, size).tolist(),
                "labels": (rng.random(size) < 0.4).astype(float).tolist(),
                "user": int(rng.integers(0, 9)),
                "click_pos": int(rng.integers(-1, 4)),
            }
        )
    return out


def _columns(rows: list[dict]) -> Impressions:
    """Impressions built field by field from the rows (no library helper)."""
    ints = np.int64
    return Impressions(
        ids=np.array([r["id"] for r in rows] or [""], dtype=str)[: len(rows)],
        hist=np.array(sum((r["hist"] for r in rows), []), dtype=ints),
        hist_len=np.array([len(r["hist"]) for r in rows], dtype=ints),
        cand=np.array(sum((r["cand"] for r in rows), []), dtype=ints),
        sizes=np.array([len(r["cand"]) for r in rows], dtype=ints),
        labels=np.array(sum((r["labels"] for r in rows), []), dtype=np.float32),
        user=np.array([r["user"] for r in rows], dtype=ints),
        click_pos=np.array([r["click_pos"] for r in rows], dtype=ints),
    )


def _as_rows(imps: Impressions) -> list[dict]:
    h = np.concatenate([[0], np.cumsum(imps.hist_len)]).tolist()
    c = np.concatenate([[0], np.cumsum(imps.sizes)]).tolist()
    return [
        {
            "id": str(imps.ids[i]),
            "hist": imps.hist[h[i] : h[i + 1]].tolist(),
            "cand": imps.cand[c[i] : c[i + 1]].tolist(),
            "labels": imps.labels[c[i] : c[i + 1]].tolist(),
            "user": int(imps.user[i]),
            "click_pos": int(imps.click_pos[i]),
        }
        for i in range(len(imps))
    ]


def _reference_batch(rows: list[dict], table, batch_size=None, history_len=None, dedup=True):
    """The batch built one sample at a time (the per-sample collate the project had)."""
    n = len(rows)
    B = batch_size or n
    H = history_len or max([len(r["hist"]) for r in rows] + [1])
    C = max([len(r["cand"]) for r in rows] + [1])
    hist, hmask = np.zeros((B, H), np.int64), np.zeros((B, H), bool)
    cand, cmask = np.zeros((B, C), np.int64), np.zeros((B, C), bool)
    labels = np.zeros((B, C), np.float32)
    for i, r in enumerate(rows):
        h = r["hist"][-H:]
        hist[i, : len(h)], hmask[i, : len(h)] = h, True
        cand[i, : len(r["cand"])], cmask[i, : len(r["cand"])] = r["cand"], True
        labels[i, : len(r["labels"])] = r["labels"]
    slots = np.concatenate([hist.ravel(), cand.ravel()])
    if dedup:
        news_rows, inv = np.unique(slots, return_inverse=True)
    else:
        news_rows, inv = slots, np.arange(slots.size)
    hist_idx, cand_idx = inv[: hist.size].reshape(B, H), inv[hist.size :].reshape(B, C)
    real = np.arange(B) < n
    return {
        "news_rows": news_rows.tolist(),
        "tokens_rows": np.asarray(table.tokens[news_rows]).tolist(),
        "hist_idx": hist_idx.tolist(),
        "hist_mask": (hmask & real[:, None]).tolist(),
        "cand_idx": cand_idx.tolist(),
        "cand_mask": (cmask & real[:, None]).tolist(),
        "labels": labels.tolist(),
        "sample_mask": real.tolist(),
        "hist_count": np.bincount(hist_idx[hmask], minlength=news_rows.size).tolist(),
        "impression_ids": tuple(r["id"] for r in rows) + ("",) * (B - n),
        "click_pos": [r["click_pos"] for r in rows] + [-1] * (B - n),
        "user_idx": [r["user"] for r in rows] + [0] * (B - n),
    }


def _batch_view(b) -> dict:
    return {
        "news_rows": b.news_rows.tolist(),
        "tokens_rows": b.tokens.tolist(),
        "hist_idx": b.hist_idx.tolist(),
        "hist_mask": b.hist_mask.tolist(),
        "cand_idx": b.cand_idx.tolist(),
        "cand_mask": b.cand_mask.tolist(),
        "labels": b.labels.tolist(),
        "sample_mask": b.sample_mask.tolist(),
        "hist_count": b.hist_count.tolist(),
        "impression_ids": b.impression_ids,
        "click_pos": b.click_pos.tolist(),
        "user_idx": b.user_idx.tolist(),
    }


def _assert_batch(b, want: dict) -> None:
    got = _batch_view(b)
    L = b.tokens.shape[1]
    want = dict(want, tokens_rows=[r[:L] for r in want["tokens_rows"]])
    assert got == want
    assert b.labels.dtype == torch.float32 and b.hist_count.dtype == torch.float32
    assert b.hist_idx.dtype == b.cand_idx.dtype == b.click_pos.dtype == torch.long


# --------------------------------------------------------------------------- the type


def test_slice_gather_concat_equal_the_rows():
    rows = _rows(23)
    imps = _columns(rows)
    assert _as_rows(imps) == rows
    for lo, hi in [(0, 0), (0, 23), (3, 11), (22, 23), (7, 7)]:
        assert _as_rows(imps.slice(lo, hi)) == rows[lo:hi]
    idx = [5, 0, 22, 5, 13, 1]
    assert _as_rows(imps.gather(np.array(idx))) == [rows[i] for i in idx]
    assert len(imps.gather(np.zeros(0, np.int64))) == 0
    cuts = [0, 4, 4, 9, 23]
    joined = Impressions.concat([imps.slice(a, b) for a, b in zip(cuts, cuts[1:])])
    assert _as_rows(joined) == rows
    assert joined.ids.dtype == np.asarray([r["id"] for r in rows], dtype=str).dtype
    assert len(Impressions.concat([])) == 0 and Impressions.concat([]).ids.dtype == "<U1"


def test_samples_and_from_samples_are_the_row_view():
    rows = _rows(9, seed=3)
    imps = _columns(rows)
    samples = list(imps.samples())
    assert [(s.impression_id, s.user, s.click_pos) for s in samples] == [
        (r["id"], r["user"], r["click_pos"]) for r in rows
    ]
    back = Impressions.from_samples(samples)
    assert _as_rows(back) == rows
    one = Impressions.from_samples([Sample("7", np.array([]), np.array([3, 4]), np.array([1, 0]))])
    assert one.hist.dtype == one.cand.dtype == np.int64 and one.labels.dtype == np.float32


@pytest.mark.parametrize("kw", [{}, {"batch_size": 40, "history_len": 3}, {"dedup": False}])
def test_collate_equals_the_per_sample_batch(tmp_path, kw):
    rng = np.random.default_rng(5)
    build_prepared(tmp_path, {"train": [make_impressions(rng, 4, 50)]}, n_news=50)
    table = NewsTable(tmp_path)
    rows = _rows(31, seed=8)
    _assert_batch(collate(_columns(rows), table, **kw), _reference_batch(rows, table, **kw))
    _assert_batch(collate(Impressions.empty(), table, batch_size=2), _reference_batch([], table, 2))


# --------------------------------------------------------------------------- round trips


def test_shard_to_collate_equals_the_raw_arrays(tmp_path):
    """Evaluation: impressions written to shards (groups of 4), read back as columns and
    collated in runs of 5 = the per-sample batches of the raw impressions."""
    rng = np.random.default_rng(2)
    shards = [make_impressions(rng, n, 40, first_id=100 * s) for s, n in enumerate([9, 14, 3])]
    build_prepared(tmp_path, {"dev": shards}, n_news=40)
    table = NewsTable(tmp_path)
    raw = [
        {"id": i, "hist": h.tolist(), "cand": c.tolist(), "labels": lab.astype(float).tolist(),
         "user": 0, "click_pos": -1}
        for sh in shards for i, h, c, lab in sh
    ]  # fmt: skip
    imps = Impressions.concat(list(eval_groups(tmp_path, "dev")))
    assert _as_rows(imps) == raw
    for lo in range(0, len(raw), 5):
        b = collate(imps.slice(lo, lo + 5), table, batch_size=5, history_len=4)
        _assert_batch(b, _reference_batch(raw[lo : lo + 5], table, 5, 4))


def _reference_train_rows(shards, order, seed, epoch, neg_k, H, buffer) -> list[dict]:
    """One worker's training samples the per-sample way: one row per click with ``neg_k``
    negatives drawn from its impression (with replacement when fewer, row 0 when none), the
    last ``H`` history news, then a reservoir shuffle buffer of ``buffer`` rows."""
    rng = np.random.default_rng([seed, epoch, 0, 0, 1])
    items = []
    for s in order:
        for iid, hist, cand, lab in shards[s]:
            cand = cand.astype(np.int64)
            neg = cand[lab == 0]
            for p in np.flatnonzero(lab == 1).tolist():
                if neg.size == 0:
                    negs = [0] * neg_k
                else:
                    negs = rng.choice(neg, size=neg_k, replace=neg.size < neg_k).tolist()
                items.append(
                    {"id": iid, "hist": hist.tolist()[-H:], "cand": [int(cand[p])] + negs,
                     "labels": [1.0] + [0.0] * neg_k, "user": 0, "click_pos": p}
                )  # fmt: skip
    rng = np.random.default_rng([seed, epoch, 0, 0, 2])
    out, buf = [], []
    for it in items:
        if len(buf) < buffer:
            buf.append(it)
            continue
        j = int(rng.integers(buffer))
        out.append(buf[j])
        buf[j] = it
    return out + [buf[j] for j in rng.permutation(len(buf)).tolist()]


@pytest.mark.parametrize("buffer,skip", [(16, 0), (1000, 0), (16, 2)])
def test_training_stream_equals_the_per_sample_path(tmp_path, buffer, skip):
    """Training: shard -> flat click samples -> shuffle -> chunks -> collate gives exactly the
    batches of the per-sample recipe (resumed batches too)."""
    rng = np.random.default_rng(4)
    shards = [make_impressions(rng, n, 40, negs=(0, 6), hist_max=8, first_id=100 * s)
              for s, n in enumerate([11, 6, 17])]  # fmt: skip
    build_prepared(tmp_path, {"train": shards}, n_news=40)
    table = NewsTable(tmp_path)
    kw = dict(rank=0, world_size=1, batch_size=6, epoch=2, seed=9, neg_k=3, history_len=4)
    loader = train_loader(
        tmp_path, **kw, shuffle_buffer=buffer, loader_workers=0, chunk_size=5,
        skip_samples=None, skip_batches=skip,
    )  # fmt: skip
    got = list(loader)
    order = epoch_plan(tmp_path, 1, seed=9, epoch=2)[0]
    rows = _reference_train_rows(shards, order, 9, 2, 3, 4, buffer)
    assert len(got) == -(-len(rows) // 6) - skip
    for k, b in enumerate(got, start=skip):
        _assert_batch(b, _reference_batch(rows[6 * k : 6 * k + 6], table, 6, 4))
