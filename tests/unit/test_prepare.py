"""`mtrec prepare` on a hand-written MIND dataset: every count, row and shard member checked.

Dataset (history_len=2, impressions_per_shard=3, max_entities=2)::

    train news: N1 sports/football "Donald Trump plays golf with Nadal"  (3 entities, 1 absent)
                N2 news/politics   "Zelenskyy visits Kyiv"
                N3 sports/tennis   "Nadal wins in Paris"                  (1 entity)
    dev news:   N2 (again, other title: first occurrence wins), N4 lifestyle/food "Pizza night"
    test news:  N5 news/world "Storm hits coast"
    rows: <pad>=0, N1=1, N2=2, N3=3, N4=4, N5=5

    train  1: hist ""           cand N1-1 N2-0 N3-0   -> hist [],     cand [1,2,3], label [1,0,0]
           2: hist N1 N9 N2 N3  cand N4-0 N2-1        -> hist [2,3],  cand [4,2],   label [0,1]
              (N9 missing; 3 valid ids truncated to the last 2)
           3: hist N3           cand N1-0 N8-0        -> hist [3],    cand [1,0],   label [0,0]
              (N8 missing -> row 0; no click)
           4: hist N2           cand N3-1 N1-1        -> hist [2],    cand [3,1],   label [1,1]
    dev   10: hist N4           cand N5-1 N1-0        -> hist [4],    cand [5,1],   label [1,0]
    test  20: hist N1 N2        cand N4 N5            -> hist [1,2],  cand [4,5]
          21: hist ""           cand N3               -> hist [],     cand [3]
"""

from __future__ import annotations

import datetime as dt
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mtrec_dist.config import load_config
from mtrec_dist.data import mind
from mtrec_dist.data.batch import NER_IGNORE, NewsTable
from mtrec_dist.data.prepare import prepare
from mtrec_dist.data.prepared import check_tokenizer, load_manifest
from mtrec_dist.data.shardfile import GROUP_MEMBER, GROUP_SIZE, decode_group
from mtrec_dist.data.tables import DataError, Entity, Impression, News
from mtrec_dist.hub import load_tokenizer, tokenizer_fingerprint
from mtrec_dist.utils import sha256_file

X = NER_IGNORE
T = dt.datetime(2019, 11, 15, 8, 55, 22)
N1_TITLE = "Donald Trump plays golf with Nadal"


def _news(nid, cat, sub, title, ents=()):
    return News(nid, cat, sub, title, "abstract", "https://x", list(ents), [])


def _imp(iid, hist, cands, labels):
    return Impression(iid, "U", T, hist, cands, labels)


def write_dataset(root: Path) -> None:
    nadal = Entity("Rafael Nadal", "P", "Q10132", 1.0, [29], ["Nadal"])
    trump = Entity("Donald Trump", "P", "Q22686", 1.0, [0], ["Donald Trump"])
    golf = Entity("Golf", "C", "Q5377", 0.9, [], ["golfing"])
    mind.write_news(
        root / "train" / "news.tsv",
        [
            _news("N1", "sports", "football", N1_TITLE, [nadal, trump, golf]),
            _news("N2", "news", "politics", "Zelenskyy visits Kyiv"),
            _news(
                "N3",
                "sports",
                "tennis",
                "Nadal wins in Paris",
                [Entity("Rafael Nadal", "P", "Q10132", 1.0, [0], ["Nadal"])],
            ),
        ],
    )
    mind.write_behaviors(
        root / "train" / "behaviors.tsv",
        [
            _imp("1", [], ["N1", "N2", "N3"], [1, 0, 0]),
            _imp("2", ["N1", "N9", "N2", "N3"], ["N4", "N2"], [0, 1]),
            _imp("3", ["N3"], ["N1", "N8"], [0, 0]),
            _imp("4", ["N2"], ["N3", "N1"], [1, 1]),
        ],
    )
    mind.write_news(
        root / "dev" / "news.tsv",
        [
            _news("N2", "news", "politics", "Another title"),
            _news("N4", "lifestyle", "food", "Pizza night"),
        ],
    )
    mind.write_behaviors(root / "dev" / "behaviors.tsv", [_imp("10", ["N4"], ["N5", "N1"], [1, 0])])
    mind.write_news(root / "test" / "news.tsv", [_news("N5", "news", "world", "Storm hits coast")])
    mind.write_behaviors(
        root / "test" / "behaviors.tsv",
        [_imp("20", ["N1", "N2"], ["N4", "N5"], None), _imp("21", [], ["N3"], None)],
    )


def make_cfg(root: Path, *extra: str):
    return load_config(
        None,
        [
            f"data.root={root}",
            "data.history_len=2",
            "data.impressions_per_shard=3",
            "data.max_entities=2",
            "data.title_len=10",
            "model.encoder=tiny",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("mind")
    write_dataset(root)
    cfg = make_cfg(root)
    manifest = prepare(cfg, progress=False, workers=2)
    return root, cfg, manifest


def read_shard(path: Path) -> list[dict]:
    """Per impression of a shard, read with webdataset's own reader: key (the impression id),
    hist, cand, label (labeled splits), user."""
    out = []
    for s in wds.WebDataset(str(path), shardshuffle=False):
        g = decode_group(s[GROUP_MEMBER])
        h, c = np.cumsum(g.hist_len), np.cumsum(g.sizes)
        for i, key in enumerate(g.ids):
            d = {"key": key, "hist": g.hist[h[i] - g.hist_len[i] : h[i]],
                 "cand": g.cand[c[i] - g.sizes[i] : c[i]], "user": int(g.user[i])}  # fmt: skip
            if g.labels is not None:
                d["label"] = g.labels[c[i] - g.sizes[i] : c[i]]
            out.append(d)
    return out


def test_manifest_counts(prepared):
    root, cfg, m = prepared
    out = cfg.prepared_dir
    assert out == root / "prepared"
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 2
    assert m["source"] == {"root": str(root), "format": "mind"}
    assert (m["title_len"], m["history_len"], m["max_entities"]) == (10, 2, 2)
    assert m["news"]["count"] == 6 and m["news"]["has_sentiment"] is False
    # users: "<unk>" + the one train user "U" (every impression here is user "U")
    assert m["news"]["vocab"] == {"category": 4, "subcategory": 6, "entities": 4, "users": 2}
    # Titles with entities: N1, N3. Surface forms looked for: Nadal, Donald Trump, golfing, Nadal.
    assert m["news"]["ner"] == {
        "titles_with_entities": 2,
        "entity_mentions": 4,
        "mentions_matched": 3,
        "mentions_not_found": 1,
    }
    sp = m["splits"]
    assert list(sp) == ["train", "dev", "test"]
    tr = sp["train"]
    assert (tr["labeled"], tr["impressions"], tr["candidates"], tr["clicks"]) == (True, 4, 9, 4)
    assert (tr["impressions_per_shard"], tr["impressions_per_group"]) == (3, GROUP_SIZE)
    assert tr["stats"] == {
        "empty_history": 1,
        "history_missing_news": 1,
        "candidates_missing_news": 1,
        "history_truncated": 1,
        "impressions_without_click": 1,
        "unknown_user": 0,
    }
    assert [(s["path"], s["impressions"], s["clicks"]) for s in tr["shards"]] == [
        ("shards/train-000000.tar", 3, 2),
        ("shards/train-000001.tar", 1, 2),
    ]
    dv = sp["dev"]
    assert (dv["labeled"], dv["impressions"], dv["candidates"], dv["clicks"]) == (True, 1, 2, 1)
    assert dv["stats"] == dict.fromkeys(tr["stats"], 0)
    te = sp["test"]
    assert (te["labeled"], te["impressions"], te["candidates"], te["clicks"]) == (False, 2, 3, 0)
    assert te["stats"] == {**dict.fromkeys(tr["stats"], 0), "empty_history": 1}
    assert [s["path"] for s in te["shards"]] == ["shards/test-000000.tar"]
    assert m["config"]["history_len"] == 2
    tok = load_tokenizer("tiny")
    assert m["tokenizer"] == {"encoder": "tiny", **tokenizer_fingerprint(tok)}


def test_news_table(prepared):
    _, cfg, _ = prepared
    out = cfg.prepared_dir
    table = NewsTable(out)
    assert table.news_ids == ["<pad>", "N1", "N2", "N3", "N4", "N5"]
    vocab = lambda n: json.loads((out / "vocab" / f"{n}.json").read_text())  # noqa: E731
    assert vocab("category") == ["<unk>", "lifestyle", "news", "sports"]
    assert vocab("subcategory") == ["<unk>", "food", "football", "politics", "tennis", "world"]
    assert vocab("entities") == [
        {"id": "<none>"},
        {"id": "Q10132", "surface": "Nadal", "type": "P"},
        {"id": "Q22686", "surface": "Donald Trump", "type": "P"},
        {"id": "Q5377", "surface": "golfing", "type": "C"},
    ]
    assert table.category.tolist() == [0, 3, 2, 3, 1, 2]
    assert table.subcategory.tolist() == [0, 2, 3, 4, 1, 5]
    assert table.category.dtype == np.int16 and table.sentiment.dtype == np.int8
    assert table.sentiment.tolist() == [-1] * 6
    # Title order: Donald Trump (Q22686 = 2) then Nadal (1); golfing (3) cut by max_entities=2.
    assert table.entities.tolist() == [[0, 0], [2, 1], [0, 0], [1, 0], [0, 0], [0, 0]]
    tok = load_tokenizer("tiny")
    titles = ["", N1_TITLE, "Zelenskyy visits Kyiv", "Nadal wins in Paris", "Pizza night",
              "Storm hits coast"]  # fmt: skip
    for row, title in enumerate(titles):
        ids = tok(title)["input_ids"]
        assert table.tokens[row].tolist() == ids + [0] * (10 - len(ids)), title
    # [CLS] donald trump plays golf with nad ##al [SEP] pad
    assert table.ner[1].tolist() == [X, 1, 2, 0, 0, 0, 1, 2, X, X]
    # [CLS] nad ##al wins in paris [SEP]
    assert table.ner[3].tolist() == [X, 1, 2, 0, 0, 0, X, X, X, X]
    assert table.ner[0].tolist() == [X] * 10


def test_shard_contents(prepared):
    _, cfg, m = prepared
    out = cfg.prepared_dir
    got = {}
    for split in ("train", "dev", "test"):
        got[split] = [
            s for sh in m["splits"][split]["shards"] for s in read_shard(out / sh["path"])
        ]

    def rows(samples):  # noqa: E306
        return [
            (s["key"], s["hist"].tolist(), s["cand"].tolist(),
             s["label"].tolist() if "label" in s else None)
            for s in samples
        ]  # fmt: skip

    assert rows(got["train"]) == [
        ("1", [], [1, 2, 3], [1, 0, 0]),
        ("2", [2, 3], [4, 2], [0, 1]),
        ("3", [3], [1, 0], [0, 0]),
        ("4", [2], [3, 1], [1, 1]),
    ]
    assert rows(got["dev"]) == [("10", [4], [5, 1], [1, 0])]
    assert rows(got["test"]) == [("20", [1, 2], [4, 5], None), ("21", [], [3], None)]
    s = got["train"][1]
    assert s["hist"].dtype == np.int32 and s["cand"].dtype == np.int32
    assert s["label"].dtype == np.uint8


def test_shard_files_hashes_and_members(prepared):
    _, cfg, m = prepared
    out = cfg.prepared_dir
    listed = []
    for split, e in m["splits"].items():
        for sh in e["shards"]:
            p = out / sh["path"]
            listed.append(p)
            assert sha256_file(p) == sh["sha256"]
            with tarfile.open(p) as tf:
                names = tf.getnames()
                groups = [decode_group(tf.extractfile(n).read()) for n in names]
            # fewer impressions than a group: one member per shard, labels iff labeled
            assert names == [f"000000.{GROUP_MEMBER}"], (split, names)
            assert [len(g) for g in groups] == [sh["impressions"]]
            assert all((g.labels is not None) == e["labeled"] for g in groups)
    assert sorted(listed) == sorted((out / "shards").iterdir())
    assert not list(out.parent.glob(".prepared.*"))  # no temporary folder left behind


def test_reprepare_replaces_and_is_deterministic(prepared, monkeypatch):
    root, cfg, m = prepared
    # A crash half-way leaves the previous folder untouched and no temporary folder.
    import mtrec_dist.data.prepare as shards_mod

    real = shards_mod.write_split

    def crash(split, *a, **k):
        if split == "dev":
            raise RuntimeError("boom")
        return real(split, *a, **k)

    monkeypatch.setattr(shards_mod, "write_split", crash)
    with pytest.raises(RuntimeError, match="boom"):
        prepare(cfg, progress=False)
    assert load_manifest(cfg.prepared_dir)["created"] == m["created"]
    assert not list(root.glob(".prepared.*"))
    monkeypatch.setattr(shards_mod, "write_split", real)
    # Re-running gives byte-identical shards (fixed tar mtimes), with one writer process as with
    # the fixture's two.
    m2 = prepare(cfg, progress=False, workers=1)
    for split in m["splits"]:
        assert m2["splits"][split]["shards"] == m["splits"][split]["shards"]
        wall = m2["splits"][split]["seconds"]  # recorded, not judged: no timing in tests
        assert wall >= 0


def test_missing_splits(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "test" / "news.tsv").unlink()
    (tmp_path / "test" / "behaviors.tsv").unlink()
    (tmp_path / "test").rmdir()
    cfg = make_cfg(tmp_path, f"data.prepared={tmp_path / 'out'}")
    m = prepare(cfg, progress=False)
    assert list(m["splits"]) == ["train", "dev"]
    # N5 came from test news only: now missing, so dev's candidate maps to row 0.
    assert m["news"]["count"] == 5
    assert m["splits"]["dev"]["stats"]["candidates_missing_news"] == 1
    cfg2 = make_cfg(
        tmp_path, f"data.prepared={tmp_path / 'out2'}", "data.splits=[train, dev, test]"
    )
    for p in (tmp_path / "dev").iterdir():
        p.unlink()
    (tmp_path / "dev").rmdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "dev")):
        prepare(cfg2, progress=False)
    assert not (tmp_path / "out2").exists()


def test_load_manifest_and_tokenizer_check(prepared, tmp_path):
    _, cfg, m = prepared
    on_disk = json.loads((cfg.prepared_dir / "manifest.json").read_text())
    assert load_manifest(cfg.prepared_dir) == on_disk
    with pytest.raises(FileNotFoundError, match="mtrec prepare"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1,\n "x": }')
    with pytest.raises(ValueError, match=r"manifest.json:2"):
        load_manifest(tmp_path)
    fp = tokenizer_fingerprint(load_tokenizer("tiny"))
    check_tokenizer(m, fp)  # same vocabulary: fine
    other = {"name": "BertTokenizer", "vocab_size": 30522, "vocab_hash": "f" * 64}
    with pytest.raises(ValueError) as e:
        check_tokenizer(m, other, encoder="/models/other-bert")
    msg = str(e.value)
    assert fp["vocab_hash"] in msg and "f" * 64 in msg
    assert "model.encoder=/models/other-bert" in msg


def test_bad_line_in_worker_names_file_and_line(tmp_path):
    write_dataset(tmp_path)
    beh = tmp_path / "dev" / "behaviors.tsv"
    beh.write_text(beh.read_text() + "11\tU\t11/15/2019 8:55:22 AM\tN1\tN2-7\n")
    cfg = make_cfg(tmp_path)
    with pytest.raises(DataError, match=f"{beh}:2: malformed impression token 'N2-7'"):
        prepare(cfg, progress=False, workers=2)
    assert not (tmp_path / "prepared").exists()
    assert not list(tmp_path.glob(".prepared.*"))


# --------------------------------------------------------------------------- user ids

# Train users U7, U10, U2: the vocabulary sorts the id strings, so U10=1, U2=2, U7=3 (string
# order, not numeric); dev's U99 and test's U5 never occur in train -> 0 (unknown user).
USERS = {"train": ["U7", "U10", "U7", "U2"], "dev": ["U99", "U2"], "test": ["U7", "U5"]}
USER_INDEX = {"train": [3, 1, 3, 2], "dev": [0, 2], "test": [3, 0]}


def write_users_dataset(root: Path) -> None:
    write_dataset(root)
    rows = {
        "train": [("1", [], ["N1", "N2", "N3"], [1, 0, 0]), ("2", ["N1"], ["N4", "N2"], [0, 1]),
                  ("3", ["N3"], ["N1", "N2"], [1, 0]), ("4", ["N2"], ["N3", "N1"], [1, 1])],
        "dev": [("10", ["N4"], ["N5", "N1"], [1, 0]), ("11", ["N1"], ["N4", "N2"], [0, 1])],
        "test": [("20", ["N1", "N2"], ["N4", "N5"], None), ("21", [], ["N3"], None)],
    }  # fmt: skip
    for split, imps in rows.items():
        mind.write_behaviors(
            root / split / "behaviors.tsv",
            [Impression(i, u, T, h, c, lab) for (i, h, c, lab), u in zip(imps, USERS[split])],
        )


@pytest.fixture(scope="module")
def with_users(tmp_path_factory):
    root = tmp_path_factory.mktemp("users")
    write_users_dataset(root)
    cfg = make_cfg(root)
    return cfg, prepare(cfg, progress=False, workers=2)


def test_user_vocabulary_and_shard_user_indices(with_users):
    cfg, m = with_users
    out = cfg.prepared_dir
    assert json.loads((out / "vocab/users.json").read_text()) == ["<unk>", "U10", "U2", "U7"]
    assert m["news"]["vocab"]["users"] == 4
    for split, want in USER_INDEX.items():
        got = []
        for sh in m["splits"][split]["shards"]:
            got += [s["user"] for s in read_shard(out / sh["path"])]
        assert got == want, split
        assert m["splits"][split]["stats"]["unknown_user"] == want.count(0)


def test_user_indices_reach_samples_and_batches(with_users):
    from mtrec_dist.data.batch import collate
    from mtrec_dist.data.stream import eval_impressions, train_loader

    cfg, _ = with_users
    out = cfg.prepared_dir
    for split, want in USER_INDEX.items():
        samples = list(eval_impressions(out, split))
        assert [s.user for s in samples] == want, split
    dev = list(eval_impressions(out, "dev"))
    batch = collate(dev, NewsTable(out), batch_size=3)
    assert batch.user_idx.tolist() == [0, 2, 0]  # unseen U99, U2, padding sample
    # The training stream: one sample per click, each with its impression's user.
    clicks = {"1": 3, "2": 1, "3": 3, "4": 2}  # impression -> user index (train)
    batches = list(
        train_loader(out, rank=0, world_size=1, batch_size=8, epoch=0, seed=0, loader_workers=0)
    )
    got = [
        (iid, int(u))
        for b in batches
        for iid, u, real in zip(b.impression_ids, b.user_idx, b.sample_mask)
        if real
    ]
    assert sorted(got) == sorted([("1", 3), ("3", 3), ("4", 2), ("4", 2), ("2", 1)])
    assert all(clicks[i] == u for i, u in got)


def test_user_models_refuse_a_folder_without_users(with_users, tmp_path):
    """A manifest without users (no news.vocab.users) reads as user 0, and LSTUR/NPA refuse
    it; a manifest that declares users range-checks every stored user index."""
    import shutil

    from mtrec_dist.data.stream import eval_impressions
    from mtrec_dist.models.registry import validate_model_config

    cfg, _ = with_users
    old = tmp_path / "prepared"
    shutil.copytree(cfg.prepared_dir, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["news"]["vocab"]["users"]
    (old / "manifest.json").write_text(json.dumps(m))
    assert [s.user for s in eval_impressions(old, "dev")] == [0, 0]
    for name in ("lstur", "npa"):
        c = make_cfg(tmp_path, f"data.prepared={old}", f"model.name={name}")
        with pytest.raises(DataError, match=r"manifest.json: no user vocabulary .*"
                           r"re-run `mtrec prepare`"):  # fmt: skip
            validate_model_config(c, m)
    validate_model_config(make_cfg(tmp_path, f"data.prepared={old}", "model.name=nrms"), m)

    # Users declared: a stored index outside the vocabulary is a DataError naming the shard and
    # the impression (every impression of the shard written below is user 0, then 3).
    from mtrec_dist.data.shardfile import ShardWriter
    from tests.unit.test_stream import N_NEWS, build_prepared, make_impressions

    root = tmp_path / "declared"
    rng = np.random.default_rng(0)
    imps = make_impressions(rng, 3, N_NEWS)
    build_prepared(root, {"dev": [imps]}, n_news=N_NEWS, unlabeled=())
    m = json.loads((root / "manifest.json").read_text())
    m["news"].setdefault("vocab", {})["users"] = 3
    with ShardWriter(root, "dev", 3) as w:
        for k, (iid, hist, cand, label) in enumerate(imps):
            w.write(iid, hist.tolist(), cand.tolist(), label.tolist(), 3 * (k == 2))
    m["splits"]["dev"]["shards"] = w.entries
    (root / "manifest.json").write_text(json.dumps(m))
    shard = root / m["splits"]["dev"]["shards"][0]["path"]
    with pytest.raises(DataError) as e:
        list(eval_impressions(root, "dev"))
    assert str(e.value) == (
        f"{shard}: impression #2 (id {imps[2][0]!r}): user 3, expected a user index in [0, 3) "
        "(news.vocab.users); re-run `mtrec prepare`"
    )


def test_evaluator_paths_carry_users(with_users, monkeypatch):
    """Both scoring paths (bi-encoder batches, cross-encoder candidate chunks) see each
    impression's user."""
    import torch

    from mtrec_dist.eval import engine
    from mtrec_dist.eval.engine import Engine

    cfg, _ = with_users
    seen: list[tuple[str, int]] = []

    class Recorder(torch.nn.Module):
        def __init__(self, cross):
            super().__init__()
            self.cross_encoder = cross

        def record(self, batch):
            seen.extend(
                (i, int(u)) for i, u, m in zip(batch.impression_ids, batch.user_idx,
                                               batch.sample_mask) if m
            )  # fmt: skip
            return torch.zeros(batch.cand_idx.shape)

        def forward(self, batch):
            from mtrec_dist.models.outputs import TaskOutputs

            return TaskOutputs({}, self.record(batch))

        def score_news_vectors(self, vecs, batch):
            return self.record(batch)

    from mtrec_dist.data.stream import eval_impressions

    monkeypatch.setattr(engine, "CROSS_CHUNK", 1)  # every candidate its own piece
    for cross in (False, True):
        seen.clear()
        eng = Engine(Recorder(cross), cfg.prepared_dir, "test")
        if not cross:
            eng.vectors = np.zeros((6, 1), np.float32)
        eng.score_many(list(eval_impressions(cfg.prepared_dir, "test")))
        want = [("20", 3), ("21", 0)] + ([("20", 3)] if cross else [])  # 20 has 2 candidates
        assert sorted(seen) == sorted(want), cross
