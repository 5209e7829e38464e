"""Streaming prepared shards: exact coverage, balance, determinism, resume, de-duplication.

The prepared folders are written here directly per the prepared-folder contract (news/*.npy,
news_ids.txt, tar shards of impression groups written by the shard writer, manifest.json),
so these tests do not depend on ``mtrec prepare``; every expectation is computed from the
fixture's own ground truth.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from mtrec_dist.data import prepared as prepared_folder
from mtrec_dist.data.batch import NewsTable, Sample, collate
from mtrec_dist.data.prepared import FORMAT_VERSION
from mtrec_dist.data.shardfile import (
    GROUP_MEMBER,
    ShardWriter,
    decode_group,
    encode_group,
    iter_shard,
    read_impressions,
)
from mtrec_dist.data.stream import (
    Impressions,
    _merged_skips,
    batches_per_epoch,
    epoch_plan,
    eval_groups,
    eval_impressions,
    rechunk,
    take,
    train_loader,
)
from mtrec_dist.data.tables import DataError

Imp = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # id, hist, cand, label


# --------------------------------------------------------------------------- fixture builder


def make_impressions(
    rng: np.random.Generator,
    n: int,
    n_news: int,
    *,
    clicks: tuple[int, int] = (1, 3),
    negs: tuple[int, int] = (0, 6),
    hist_max: int = 6,
    first_id: int = 1,
) -> list[Imp]:
    """``n`` random impressions: distinct candidates, clicks/negatives counts in the ranges.

    Ids are zero-padded strings ("0007"): the stream must carry them unchanged."""
    out, iid = [], first_id
    for _ in range(n):
        c, g = int(rng.integers(clicks[0], clicks[1] + 1)), int(rng.integers(negs[0], negs[1] + 1))
        rows = rng.choice(np.arange(1, n_news), size=c + g, replace=False)
        label = np.zeros(c + g, dtype=np.uint8)
        label[:c] = 1
        perm = rng.permutation(c + g)
        hist = rng.choice(np.arange(1, n_news), size=int(rng.integers(0, hist_max + 1)))
        out.append((f"{iid:04d}", hist.astype(np.int32), rows[perm].astype(np.int32), label[perm]))
        iid += int(rng.integers(1, 4))
    return out


def build_prepared(
    root: Path,
    splits: dict[str, list[list[Imp]]],
    *,
    n_news: int,
    title_len: int = 8,
    history_len: int = 6,
    unlabeled: tuple[str, ...] = ("test",),
    seed: int = 0,
    group_size: int = 4,
) -> dict:
    """Write a prepared folder holding ``splits`` (split -> shards -> impressions), packed
    ``group_size`` impressions per tar member (small: shards of several groups)."""
    rng = np.random.default_rng(seed)
    news = root / "news"
    news.mkdir(parents=True)
    tokens = np.zeros((n_news, title_len), dtype=np.int32)
    ner = np.full((n_news, title_len), 255, dtype=np.uint8)
    for i in range(n_news):
        n = 0 if i == 0 else int(rng.integers(1, title_len - 1))  # row 0: [CLS][SEP]
        tokens[i, : n + 2] = [101, *rng.integers(1000, 30000, size=n), 102]
        ner[i, 1 : n + 1] = rng.integers(0, 3, size=n)
    np.save(news / "tokens.npy", tokens)
    np.save(news / "ner.npy", ner)
    np.save(news / "category.npy", rng.integers(0, 5, n_news).astype(np.int16))
    np.save(news / "subcategory.npy", rng.integers(0, 9, n_news).astype(np.int16))
    np.save(news / "sentiment.npy", rng.integers(-1, 3, n_news).astype(np.int8))
    np.save(news / "entities.npy", rng.integers(0, 7, (n_news, 3)).astype(np.int32))
    (news / "news_ids.txt").write_text(
        "\n".join(["<pad>"] + [f"N{i}" for i in range(1, n_news)]) + "\n", encoding="utf-8"
    )
    msplits = {}
    for split, shards in splits.items():
        labeled = split not in unlabeled
        entries = []
        for s, imps in enumerate(shards):
            w = ShardWriter(root, split, len(imps), group_size=group_size, start_shard=s)
            for iid, hist, cand, label in imps:
                w.write(iid, hist.tolist(), cand.tolist(), label.tolist() if labeled else None, 0)
            entries += w.close()
        msplits[split] = {
            "labeled": labeled,
            "impressions": sum(e["impressions"] for e in entries),
            "clicks": sum(e["clicks"] for e in entries),
            "shards": entries,
        }
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"vocab_hash": "test"},
        "title_len": title_len,
        "history_len": history_len,
        "news": {"count": n_news},
        "splits": msplits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return manifest


SIZES = (12, 5, 9, 3, 14, 7, 10)  # 60 impressions in 7 uneven shards
N_NEWS = 80


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rng = np.random.default_rng(7)
    shards, first = [], 1
    for n in SIZES:
        imps = make_impressions(rng, n, N_NEWS, first_id=first)
        shards.append(imps)
        first = int(imps[-1][0]) + 1
    dev = [make_impressions(rng, 4, N_NEWS, first_id=1000)]
    test = [make_impressions(rng, 3, N_NEWS, first_id=2000)]
    root = tmp_path_factory.mktemp("prep")
    manifest = build_prepared(root, {"train": shards, "dev": dev, "test": test}, n_news=N_NEWS)
    truth = {imp[0]: imp for s in shards for imp in s}
    return root, manifest, shards, truth


def collect(loader) -> list:
    """Materialise the batches (a loader is iterated once)."""
    return list(loader)


def real_rows(b):
    """Per real sample: (impression id, click pos, cand rows, hist rows, labels)."""
    out = []
    for i in range(b.sample_mask.shape[0]):
        if not b.sample_mask[i]:
            continue
        cand = b.news_rows[b.cand_idx[i][b.cand_mask[i]]].tolist()
        hist = b.news_rows[b.hist_idx[i][b.hist_mask[i]]].tolist()
        out.append((b.impression_ids[i], int(b.click_pos[i]), cand, hist, b.labels[i].tolist()))
    return out


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        for f in a.__dataclass_fields__:
            x, y = getattr(a, f), getattr(b, f)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f


# --------------------------------------------------------------------------- tests


def test_round_trip_two_ranks_two_workers(prepared):
    root, manifest, shards, truth = prepared
    bs, K, W = 8, 4, 2
    all_clicks = {(i, p) for i, (_, _, _, lab) in truth.items() for p in np.flatnonzero(lab)}
    per_epoch = {}
    for epoch in (0, 1):
        plan = epoch_plan(manifest, W, seed=3, epoch=epoch)
        # every shard on exactly one rank; balanced within the largest shard's clicks
        assert sorted(i for p in plan for i in p) == list(range(len(SIZES)))
        shard_clicks = [sum(int(x[3].sum()) for x in s) for s in shards]
        rank_clicks = [sum(shard_clicks[i] for i in p) for p in plan]
        assert max(rank_clicks) - min(rank_clicks) <= max(shard_clicks)
        n = batches_per_epoch(manifest, W, bs, seed=3, epoch=epoch)
        assert n == math.ceil(max(rank_clicks) / bs)
        seq = []
        for rank in range(W):
            loader = train_loader(
                root, rank=rank, world_size=W, batch_size=bs, epoch=epoch, seed=3,
                neg_k=K, shuffle_buffer=16, loader_workers=2,
            )  # fmt: skip
            batches = collect(loader)
            assert len(batches) == n
            assert loader.position == rank_clicks[rank] and loader.batches_done == n
            rows = [r for b in batches for r in real_rows(b)]
            assert len(rows) == rank_clicks[rank]
            # real samples fill batches from the front: padding only at the end
            mask = torch.cat([b.sample_mask for b in batches])
            assert mask.tolist() == [True] * len(rows) + [False] * (n * bs - len(rows))
            rank_imps = {x[0] for i in plan[rank] for x in shards[i]}
            for iid, pos, cand, hist, labels in rows:
                assert iid in rank_imps
                _, t_hist, t_cand, t_lab = truth[iid]
                assert t_lab[pos] == 1 and cand[0] == t_cand[pos]
                assert len(cand) == 1 + K and labels == [1.0] + [0.0] * K
                negatives = set(t_cand[t_lab == 0].tolist()) or {0}
                assert set(cand[1:]) <= negatives
                assert hist == t_hist.tolist()
            for b in batches:
                assert b.hist_idx.shape == (bs, 50) and b.cand_idx.shape == (bs, 1 + K)
            seq += rows
        keys = [(r[0], r[1]) for r in seq]
        assert len(keys) == len(set(keys)) and set(keys) == all_clicks
        per_epoch[epoch] = seq
    # a new epoch: same sample set (checked above), new order and new negatives
    assert [r[:2] for r in per_epoch[0]] != [r[:2] for r in per_epoch[1]]
    neg0 = {r[:2]: r[2] for r in per_epoch[0]}
    neg1 = {r[:2]: r[2] for r in per_epoch[1]}
    assert sum(neg0[k] != neg1[k] for k in neg0) > len(neg0) // 2


def test_shuffle_buffer_zero_is_shard_order(prepared):
    root, manifest, shards, truth = prepared
    plan = epoch_plan(manifest, 1, seed=0, epoch=0)[0]
    expected = [
        (iid, int(p)) for i in plan for iid, _, _, lab in shards[i] for p in np.flatnonzero(lab)
    ]
    loader = train_loader(
        root, rank=0, world_size=1, batch_size=16, epoch=0, seed=0,
        shuffle_buffer=0, loader_workers=0,
    )  # fmt: skip
    assert [r[:2] for b in loader for r in real_rows(b)] == expected


def test_deterministic_and_resume(prepared):
    root, manifest, _, _ = prepared
    bs = 4
    args = dict(rank=0, world_size=2, batch_size=bs, epoch=2, seed=5, shuffle_buffer=8)
    for workers in (0, 2):
        kw = dict(args, loader_workers=workers, chunk_size=5)  # small chunks: many rounds
        full = collect(train_loader(root, **kw))
        assert_batches_equal(full, collect(train_loader(root, **kw)))
        total = sum(int(b.sample_mask.sum()) for b in full)
        for k in (1, 3, 7):  # batch boundaries falling inside chunks of either worker
            loader = train_loader(root, skip_samples=k * bs, **kw)
            assert len(loader) == len(full) - k
            tail = collect(loader)
            assert_batches_equal(tail, full[k:])
            assert loader.position == total
        # resume after the rank ran out of samples and was yielding padding batches
        last = len(full) - 1
        assert not full[last].sample_mask.any()
        tail = collect(train_loader(root, skip_samples=total, skip_batches=last, **kw))
        assert_batches_equal(tail, full[last:])
    with pytest.raises(ValueError, match="multiple of batch_size"):
        train_loader(root, skip_samples=3, loader_workers=0, **args)


def test_merged_skips_matches_round_robin():
    counts, c = [7, 12, 0, 3], 3
    merged = []  # simulate the DataLoader's round-robin merge of per-worker chunks
    streams = [[(w, j) for j in range(n)] for w, n in enumerate(counts)]
    for r in range(max(math.ceil(n / c) for n in counts)):
        for s in streams:
            merged += s[r * c : (r + 1) * c]
    for n in range(sum(counts) + 1):
        got = _merged_skips(counts, c, n)
        assert got == [sum(1 for w, _ in merged[:n] if w == k) for k in range(len(counts))]
    with pytest.raises(ValueError):
        _merged_skips(counts, c, sum(counts) + 1)


def test_dedup_same_encoder_inputs(prepared):
    root, _, _, _ = prepared
    kw = dict(rank=0, world_size=1, batch_size=8, epoch=0, seed=1, loader_workers=0)
    table = NewsTable(root)
    on = collect(train_loader(root, dedup=True, **kw))
    off = collect(train_loader(root, dedup=False, **kw))
    for a, b in zip(on, off):
        assert a.impression_ids == b.impression_ids
        assert torch.equal(a.hist_mask, b.hist_mask) and torch.equal(a.cand_mask, b.cand_mask)
        assert a.num_titles <= b.num_titles
        for idx in ("hist_idx", "cand_idx"):
            ia, ib = getattr(a, idx), getattr(b, idx)
            L = max(a.tokens.shape[1], b.tokens.shape[1])
            ta = torch.nn.functional.pad(a.tokens, (0, L - a.tokens.shape[1]))[ia]
            tb = torch.nn.functional.pad(b.tokens, (0, L - b.tokens.shape[1]))[ib]
            assert torch.equal(ta, tb)
            for f in ("category", "subcategory", "sentiment"):
                assert torch.equal(getattr(a, f)[ia], getattr(b, f)[ib])
        real_hist = int(a.hist_mask.sum())
        assert a.hist_count.sum() == real_hist and b.hist_count.sum() == real_hist
        # occurrence weights: count of each unique row among real history slots
        occ = Counter(a.news_rows[a.hist_idx[a.hist_mask]].tolist())
        assert a.hist_count.tolist() == [occ.get(r, 0) for r in a.news_rows.tolist()]
        # the encoder inputs are the table's rows
        assert torch.equal(
            a.tokens, torch.from_numpy(table.tokens[a.news_rows.numpy()][:, : a.tokens.shape[1]])
        )


def test_few_and_zero_negatives_and_history_truncation(tmp_path):
    rng = np.random.default_rng(0)
    few = make_impressions(rng, 6, 30, clicks=(1, 2), negs=(2, 2), hist_max=6)
    none = make_impressions(rng, 4, 30, clicks=(1, 3), negs=(0, 0), first_id=500)
    build_prepared(tmp_path, {"train": [few, none]}, n_news=30)
    truth = {x[0]: x for x in few + none}
    loader = train_loader(
        tmp_path, rank=0, world_size=1, batch_size=5, epoch=0, seed=0, neg_k=4,
        history_len=3, loader_workers=0,
    )  # fmt: skip
    rows = [r for b in loader for r in real_rows(b)]
    assert len(rows) == sum(int(x[3].sum()) for x in truth.values())
    n_pad = 0
    for iid, pos, cand, hist, _ in rows:
        _, t_hist, t_cand, t_lab = truth[iid]
        assert cand[0] == t_cand[pos]
        assert hist == t_hist[-3:].tolist()
        if int(iid) >= 500:
            assert cand[1:] == [0, 0, 0, 0]
            n_pad += 1
        else:
            negs = t_cand[t_lab == 0].tolist()
            assert len(negs) == 2 and set(cand[1:]) <= set(negs)
            assert len(set(cand[1:])) <= 2  # 4 draws from 2: with replacement
    assert loader.padding_negatives == n_pad == sum(int(x[3].sum()) for x in none)


def test_rank_without_shards_yields_padding(prepared):
    root, manifest, _, _ = prepared
    W = len(SIZES) + 2  # ranks 7 and 8 get no shard
    n = batches_per_epoch(manifest, W, 4, seed=0, epoch=0)
    plan = epoch_plan(manifest, W, seed=0, epoch=0)
    assert plan[7] == [] and plan[8] == []
    shard_clicks = [sum(int(x[3].sum()) for x in s) for s in prepared[2]]
    assert n == math.ceil(max(shard_clicks[p[0]] for p in plan[:7]) / 4)  # one shard per rank
    for workers in (0, 2):
        loader = train_loader(
            root, rank=8, world_size=W, batch_size=4, epoch=0, seed=0, loader_workers=workers
        )
        batches = collect(loader)
        assert len(batches) == n
        for b in batches:
            assert not b.sample_mask.any() and not b.cand_mask.any()
            assert b.cand_idx.shape == (4, 5) and b.hist_idx.shape == (4, 50)
            assert b.hist_count.sum() == 0
        assert loader.position == 0


def test_eval_impressions(prepared):
    root, _, _, _ = prepared
    dev = list(eval_impressions(root, "dev"))
    test = list(eval_impressions(root, "test"))
    rng = np.random.default_rng(7)  # regenerate the fixture's ground truth
    for n in SIZES:
        make_impressions(rng, n, N_NEWS)
    t_dev = make_impressions(rng, 4, N_NEWS, first_id=1000)
    t_test = make_impressions(rng, 3, N_NEWS, first_id=2000)
    for got, exp, labeled in ((dev, t_dev, True), (test, t_test, False)):
        assert [s.impression_id for s in got] == [x[0] for x in exp]
        for s, (_, hist, cand, label) in zip(got, exp):
            assert s.hist.tolist() == hist.tolist() and s.cand.tolist() == cand.tolist()
            assert s.labels.tolist() == (label if labeled else 0 * label).tolist()
    train = list(eval_impressions(root, "train", shard_indices=[3, 1]))
    assert [s.impression_id for s in train] == [x[0] for i in (3, 1) for x in prepared[2][i]]


def test_errors(prepared, tmp_path):
    root, _, shards, _ = prepared
    with pytest.raises(FileNotFoundError, match="mtrec prepare"):
        train_loader(tmp_path, rank=0, world_size=1, batch_size=4, epoch=0, seed=0)
    # a shard listed in the manifest but missing on disk
    build_prepared(tmp_path / "a", {"train": shards[:2]}, n_news=N_NEWS)
    (tmp_path / "a/shards/train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-000001\.tar.*mtrec prepare"):
        train_loader(tmp_path / "a", rank=0, world_size=1, batch_size=4, epoch=0, seed=0)
    # a member that is not an impression group (here a pickled .npy) is refused, not unpickled
    build_prepared(tmp_path / "b", {"train": shards[:1]}, n_news=N_NEWS)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with wds.TarWriter(str(tmp_path / "b/shards/train-000000.tar")) as w:
        w.write({"__key__": "000000", "imps.bin": pickled.getvalue()})
    with pytest.raises(
        DataError, match=r"train-000000.tar: member '000000.imps.bin' \(impressions from #0\): "
        r"not an impression group \(header b'\\x93NUM' version \d+: expected b'MTRG'",
    ):  # fmt: skip
        list(eval_impressions(tmp_path / "b", "train"))
    # the manifest's click count is checked against the shard
    m = json.loads((tmp_path / "a/manifest.json").read_text())
    m["splits"]["train"]["shards"] = m["splits"]["train"]["shards"][:1]
    m["splits"]["train"]["shards"][0]["clicks"] += 1
    (tmp_path / "a/manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="manifest says"):
        list(train_loader(tmp_path / "a", rank=0, world_size=1, batch_size=4, epoch=0, seed=0,
                          loader_workers=0))  # fmt: skip
    with pytest.raises(ValueError, match="rank 2"):
        train_loader(root, rank=2, world_size=2, batch_size=4, epoch=0, seed=0)


def test_collate_empty_padding_batch(prepared):
    """collate() of no samples (the padding batch) keeps hist shape and masks everything."""
    root = prepared[0]
    b = collate([], NewsTable(root), batch_size=3, history_len=5)
    assert b.hist_idx.shape == (3, 5) and not b.sample_mask.any() and b.news_rows.tolist() == [0]


def _group_fields(g) -> list[tuple]:
    """Per impression of a decoded group: (id, hist, cand, label or None, user) as lists."""
    h, c = np.cumsum(g.hist_len).tolist(), np.cumsum(g.sizes).tolist()
    return [
        (g.ids[i], g.hist[h[i] - g.hist_len[i] : h[i]].tolist(),
         g.cand[c[i] - g.sizes[i] : c[i]].tolist(),
         None if g.labels is None else g.labels[c[i] - g.sizes[i] : c[i]].tolist(),
         int(g.user[i]))
        for i in range(len(g))
    ]  # fmt: skip


def test_standard_readers_give_what_the_loader_yields(prepared):
    """webdataset's own reader and plain tarfile read every shard; decoded, their groups are
    exactly the impressions eval_impressions (the project's reader) yields, in order."""
    root, manifest, _, _ = prepared
    for split, info in manifest["splits"].items():
        shard_paths = [root / sh["path"] for sh in info["shards"]]
        via_wds, via_tarfile = [], []
        for p in shard_paths:
            ds = wds.WebDataset(str(p), shardshuffle=False)
            samples = list(ds)
            assert [set(x) - {"__key__", "__url__", "__local_path__"} for x in samples] == [
                {GROUP_MEMBER}
            ] * len(samples)
            for x in samples:
                via_wds += _group_fields(decode_group(x[GROUP_MEMBER]))
            with tarfile.open(p) as tf:
                names = tf.getnames()
                assert names == [f"{g:06d}.{GROUP_MEMBER}" for g in range(len(names))]
                for m in tf.getmembers():
                    via_tarfile += _group_fields(decode_group(tf.extractfile(m).read()))
        assert via_wds == via_tarfile
        ours = list(eval_impressions(root, split))
        labeled = info["labeled"]
        want = [
            (s.impression_id, s.hist.tolist(), s.cand.tolist(),
             s.labels.astype(np.uint8).tolist() if labeled else None, s.user)
            for s in ours
        ]  # fmt: skip
        assert via_wds == want
        assert len(want) == info["impressions"] and len(shard_paths) > 0
    # groups of 4: a shard of 12 impressions holds 3 members, one of 5 holds 2 (4 + 1)
    with tarfile.open(root / manifest["splits"]["train"]["shards"][0]["path"]) as tf:
        assert len(tf.getnames()) == math.ceil(SIZES[0] / 4)


def test_group_layout_bytes():
    """encode_group writes exactly the documented layout (built here by hand with struct)."""
    ids = ["007", "x-1"]
    hist, cand, label, user = [5, 6, 7], [1, 0, 3], [1, 0, 0], [2, 0]
    got = encode_group(ids, [2, 1], [1, 2], user, hist, cand, label)
    text = b"007\nx-1"
    want = (
        struct.pack("<4s7I", b"MTRG", 1, 2, 1, 3, 3, len(text), 0)
        + struct.pack("<2i", 2, 1) + struct.pack("<2i", 1, 2) + struct.pack("<2i", 2, 0)
        + struct.pack("<3i", *hist) + struct.pack("<3i", *cand) + bytes(label) + text
    )  # fmt: skip
    assert got == want
    g = decode_group(got)
    assert _group_fields(g) == [("007", [5, 6], [1], [1], 2), ("x-1", [7], [0, 3], [0, 0], 0)]
    unlabeled = encode_group(ids, [2, 1], [1, 2], user, hist, cand, None)
    assert len(unlabeled) == len(got) - 3 and decode_group(unlabeled).labels is None
    assert decode_group(encode_group([], [], [], [], [], [], None)).ids.tolist() == []
    for bad, why in (
        (got[:-1], "89 bytes, expected 90 for 2 impressions, 3 history rows, 3 candidates"),
        (b"MTRX" + got[4:], "expected b'MTRG' version 1"),
        (got[:32] + struct.pack("<i", 3) + got[36:], "lengths do not add up"),
        (got[:-3] + b"7\n1", "3 impression ids for 2 impressions"),
    ):
        with pytest.raises(ValueError, match=why):
            decode_group(bad)


def test_damaged_tar_structure_is_named(prepared, tmp_path):
    """tarfile alone takes a corrupt header or a cut between members for the end of the
    archive; the reader requires the end-of-archive marker after the last member."""
    root, manifest, _, _ = prepared
    src = root / manifest["splits"]["train"]["shards"][0]["path"]
    data = src.read_bytes()
    with tarfile.open(src) as tf:
        ms = tf.getmembers()
    bad = tmp_path / "bad.tar"
    flipped = bytearray(data)
    flipped[ms[1].offset + 10] ^= 1  # the name field of the 2nd member's header
    bad.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=rf"^{bad}: after member '{ms[0].name}': tar header "
                       r"checksum mismatch"):  # fmt: skip
        list(iter_shard(bad))
    bad.write_bytes(data[: ms[2].offset])  # cut between members
    with pytest.raises(DataError, match=rf"^{bad}: truncated: the file ends after member "
                       rf"'{ms[1].name}' without the tar end-of-archive marker"):  # fmt: skip
        list(iter_shard(bad))
    bad.write_bytes(data[: ms[1].offset_data + 5])  # cut inside a member
    with pytest.raises(DataError, match=rf"^{bad}: truncated: the file ends inside member "
                       rf"'{ms[1].name}'"):  # fmt: skip
        list(iter_shard(bad))
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="not an uncompressed tar shard"):
        list(iter_shard(bad))
    assert sum(len(g) for g in iter_shard(src)) == SIZES[0]


# --------------------------------------------------------------------------- the eval reader


def _split_truth(prepared, split: str) -> list[Imp]:
    """The fixture's impressions of ``split`` in shard order (regenerated for dev/test)."""
    if split == "train":
        return [imp for shard in prepared[2] for imp in shard]
    rng = np.random.default_rng(7)
    for n in SIZES:
        make_impressions(rng, n, N_NEWS)
    dev = make_impressions(rng, 4, N_NEWS, first_id=1000)
    return dev if split == "dev" else make_impressions(rng, 3, N_NEWS, first_id=2000)


def _flat_truth(imps: list[Imp], labeled: bool) -> dict[str, list]:
    return {
        "ids": [x[0] for x in imps],
        "sizes": [len(x[2]) for x in imps],
        "cand": [int(r) for x in imps for r in x[2]],
        "labels": [float(v) if labeled else 0.0 for x in imps for v in x[3]],
        "hist_len": [len(x[1]) for x in imps],
        "hist": [int(r) for x in imps for r in x[1]],
        "user": [0] * len(imps),
    }


def _fields(g: Impressions) -> dict[str, list]:
    return {f: getattr(g, f).tolist() for f in _flat_truth([], True)}


def _old_eval_impressions(root, split: str, shard_indices=None) -> list[Sample]:
    """The per-impression reader the evaluator used before the group reader, verbatim: one
    Sample per impression of ``read_impressions`` (the training stream's reader)."""
    pf = prepared_folder
    manifest = pf.load_manifest(root)
    found = pf.shards(root, manifest, split)
    labeled = pf.is_labeled(manifest, split, root)
    n_news, n_users = int(manifest["news"]["count"]), pf.num_users(manifest)
    out = []
    for i in range(len(found)) if shard_indices is None else shard_indices:
        for imp, hist, cand, label, user in read_impressions(found[i], labeled, n_news, n_users):
            out.append(Sample(imp, hist, cand, label.astype(np.float32), user=user))
    return out


def test_eval_groups_yield_each_shard_group_as_flat_arrays(prepared):
    """One Impressions per tar member (groups of 4: a shard of 14 gives 4, 4, 4, 2), its
    fields the fixture's impressions laid flat; dtypes as the scorer takes them."""
    root, manifest, _, _ = prepared
    for split, info in manifest["splits"].items():
        groups = list(eval_groups(root, split))
        per_shard = [sh["impressions"] for sh in info["shards"]]
        assert [len(g) for g in groups] == [
            min(4, n - k) for n in per_shard for k in range(0, n, 4)
        ]
        for f, want in _flat_truth(_split_truth(prepared, split), info["labeled"]).items():
            assert [v for g in groups for v in getattr(g, f).tolist()] == want, (split, f)
        for g in groups:
            assert g.ids.dtype == np.asarray(g.ids.tolist(), dtype=str).dtype
            for f in ("sizes", "cand", "hist_len", "hist", "user"):
                assert getattr(g, f).dtype == np.int64, f
            assert g.labels.dtype == np.float32
            assert int(g.sizes.sum()) == g.cand.size == g.labels.size
            assert int(g.hist_len.sum()) == g.hist.size


def test_group_reader_equals_the_per_impression_reader_field_by_field(prepared):
    """eval_groups (and its per-impression view eval_impressions) == what the evaluator's old
    per-impression reader yielded: ids, hist, cand, labels (values and dtypes), user, in order,
    shard order as asked."""
    root, manifest, _, _ = prepared
    cases = [(s, None) for s in manifest["splits"]] + [("train", [3, 1, 6])]
    for split, order in cases:
        old = _old_eval_impressions(root, split, order)
        groups = list(eval_groups(root, split, shard_indices=order))
        views = list(eval_impressions(root, split, shard_indices=order))
        flat = Impressions.concat(groups)
        assert _fields(flat) == _fields(Impressions.from_samples(old))
        assert len(views) == len(old) == len(flat) > 0
        for a, b in zip(views, old):
            assert a.impression_id == b.impression_id and a.user == b.user
            assert a.click_pos == b.click_pos == -1
            for f in ("hist", "cand", "labels"):
                x, y = getattr(a, f), getattr(b, f)
                assert x.dtype == y.dtype and x.tolist() == y.tolist(), f


def test_parts_and_chunks_cut_the_group_stream_exactly(prepared):
    """read_part (parts of 7 across groups of 4 and shard boundaries), take and rechunk give
    the fixture's impressions [a, b), ids at the width np.asarray gives the same ids."""
    from mtrec_dist.eval.engine import plan_parts, read_part

    root, manifest, _, _ = prepared
    truth = _split_truth(prepared, "train")
    parts = plan_parts(manifest, "train", 7)
    assert len(parts) == 9 and any(len(p.shards) > 1 for p in parts)
    for p in parts:
        got = read_part(root, "train", p)
        want = truth[p.first : p.first + p.count]
        assert _fields(got) == _flat_truth(want, True), p
        assert got.ids.dtype == np.asarray([x[0] for x in want], dtype=str).dtype
    for skip, count in ((0, None), (5, 13), (0, 4), (59, None), (60, None), (3, 0)):
        got = Impressions.concat(list(take(eval_groups(root, "train"), skip, count)))
        want = truth[skip : None if count is None else skip + count]
        assert _fields(got) == _flat_truth(want, True), (skip, count)
    chunks = list(rechunk(eval_groups(root, "train"), 7))
    assert [len(c) for c in chunks] == [7] * 8 + [4]
    for k, c in enumerate(chunks):
        assert _fields(c) == _flat_truth(truth[7 * k : 7 * k + 7], True), k
    assert _fields(Impressions.concat([])) == _flat_truth([], True)
