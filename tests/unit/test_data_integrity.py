"""Nothing silently lost or changed between the source files and the stream.

Shards are damaged by hand (cut at a sample boundary, cut inside a sample, one payload byte
changed, a sample dropped from an otherwise well-formed tar); every case must fail naming the
shard, and the sample where one is to blame. The prepare side gets hand-written MIND files with
a repeated impression id, zero-padded ids and empty files.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mtrec_dist.data import prepared as P
from mtrec_dist.data.shards import prepare
from mtrec_dist.data.stream import epoch_plan, eval_impressions, iter_shard, train_loader
from mtrec_dist.data.tables import DataError
from tests.unit.test_prepare import _imp, make_cfg, write_dataset
from tests.unit.test_stream import N_NEWS, build_prepared, make_impressions

# --------------------------------------------------------------------------- damaged shards


@pytest.fixture
def small(tmp_path):
    """Train: 2 shards of 5 impressions; dev: 1 shard of 4 (every impression has a click)."""
    rng = np.random.default_rng(3)
    train = [
        make_impressions(rng, 5, N_NEWS, first_id=1),
        make_impressions(rng, 5, N_NEWS, first_id=100),
    ]
    dev = [make_impressions(rng, 4, N_NEWS, first_id=1000)]
    manifest = build_prepared(tmp_path, {"train": train, "dev": dev}, n_news=N_NEWS)
    return tmp_path, manifest, train, dev


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def cut(path: Path, offset: int) -> None:
    path.write_bytes(path.read_bytes()[:offset])


def stdlib_keys(path: Path) -> list[str]:
    """Sample keys as the standard library reads them (it takes a cut tar for a short one)."""
    with tarfile.open(path) as tf:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tf.getmembers()))


def loader(root: Path, **kw):
    args = dict(rank=0, world_size=1, batch_size=4, epoch=0, seed=0, loader_workers=0)
    return train_loader(root, **(args | kw))


def test_train_shard_cut_inside_a_sample_says_truncated(small):
    root, _, train, _ = small
    shard = root / "shards/train-000000.tar"
    ms = members(shard)
    k = [m.name for m in ms].index(f"{train[0][2][0]}.label.npy")
    cut(shard, ms[k].offset)  # the other members of sample #2 are still complete
    with pytest.raises(DataError) as e:
        list(loader(root))
    assert str(e.value) == (
        f"{shard}: truncated: the file ends after member {ms[k - 1].name!r} without the tar "
        "end-of-archive marker; re-run `mtrec prepare`"
    )  # before: "sample 3: missing ['label.npy']"


@pytest.mark.parametrize("split", ["train", "dev"])
def test_shard_cut_at_a_sample_boundary_says_truncated(small, split):
    root, manifest, train, dev = small
    shard = root / f"shards/{split}-000000.tar"
    imps = (train if split == "train" else dev)[0]
    first_of_fourth = [m for m in members(shard) if m.name.startswith(f"{imps[3][0]}.")][0]
    cut(shard, first_of_fourth.offset)
    # the standard library reads it as a shorter shard: exactly the silent loss to refuse
    assert stdlib_keys(shard) == [x[0] for x in imps[:3]]
    with pytest.raises(DataError, match=rf"^{shard}: truncated: the file ends after member "
                       rf"'{imps[2][0]}\.\w+\.npy' without the tar end-of-archive marker"):  # fmt: skip
        if split == "train":
            list(loader(root))
        else:
            list(eval_impressions(root, "dev"))


def test_well_formed_shard_with_a_sample_less_is_counted(small):
    root, manifest, _, dev = small
    shard = root / "shards/dev-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        for iid, hist, cand, label in dev[0][:3]:
            w.write({"__key__": iid, "hist.npy": hist, "cand.npy": cand, "label.npy": label})
    got = []
    with pytest.raises(DataError, match=rf"^{shard}: holds 3 impressions but the manifest says 4"):
        for s in eval_impressions(root, "dev"):
            got.append(s.impression_id)
    assert got == [x[0] for x in dev[0][:3]]  # read, then refused at the end of the shard


def _payload_offset(shard: Path, name: str) -> tuple[int, int]:
    """(offset of the array data of member ``name``, its npy header length)."""
    m = [m for m in members(shard) if m.name == name][0]
    data = shard.read_bytes()[m.offset_data : m.offset_data + m.size]
    hlen = 10 + int.from_bytes(data[8:10], "little")
    return m.offset_data + hlen, hlen


def test_changed_in_range_id_fails_the_sha256(small):
    root, manifest, _, dev = small
    shard = root / "shards/dev-000000.tar"
    key, _, cand, _ = dev[0][1]
    at, _ = _payload_offset(shard, f"{key}.cand.npy")
    data = bytearray(shard.read_bytes())
    old = int(cand[0])
    new = old + 1 if old + 1 < N_NEWS else old - 1
    data[at : at + 4] = new.to_bytes(4, "little")  # still a valid news row
    shard.write_bytes(bytes(data))
    want = manifest["splits"]["dev"]["shards"][0]["sha256"]
    with pytest.raises(DataError, match=rf"^{shard}: sha256 [0-9a-f]{{64}} differs from the "
                       rf"manifest's {want}"):  # fmt: skip
        list(eval_impressions(root, "dev"))


def test_label_out_of_range_names_shard_and_sample(small):
    root, _, _, dev = small
    shard = root / "shards/dev-000000.tar"
    key, _, _, label = dev[0][2]
    at, _ = _payload_offset(shard, f"{key}.label.npy")
    zero = int(np.flatnonzero(label == 0)[0]) if (label == 0).any() else 0
    data = bytearray(shard.read_bytes())
    data[at + zero] = 2  # a label flipped 0 -> 2
    shard.write_bytes(bytes(data))
    bad = label.tolist()
    bad[zero] = 2
    with pytest.raises(DataError) as e:
        list(eval_impressions(root, "dev"))
    assert str(e.value) == (
        f"{shard}: sample #2 (key {key!r}): labels {bad}: expected 0 or 1 per candidate"
    )


@pytest.mark.parametrize("member", ["cand.npy", "hist.npy"])
def test_id_out_of_range_names_shard_and_sample(small, member):
    root, _, train, _ = small
    shard = root / "shards/train-000001.tar"
    imps = train[1]
    i = next(j for j, x in enumerate(imps) if x[1].size) if member == "hist.npy" else 0
    key, hist, cand, _ = imps[i]
    at, _ = _payload_offset(shard, f"{key}.{member}")
    data = bytearray(shard.read_bytes())
    data[at + 3] ^= 0x01  # high byte of the first int32: row + 2**24
    shard.write_bytes(bytes(data))
    row = int((cand if member == "cand.npy" else hist)[0]) + (1 << 24)
    lo = 0 if member == "cand.npy" else 1
    with pytest.raises(DataError) as e:
        list(eval_impressions(root, "train", shard_indices=[1]))
    assert str(e.value) == (
        f"{shard}: sample #{i} (key {key!r}): {member} holds news row {row}, expected "
        f"{lo} <= row < {N_NEWS} (the news table's rows); re-run `mtrec prepare`"
    )
    with pytest.raises(DataError, match=rf"sample #{i} \(key '{key}'\): {member} holds news row"):
        list(loader(root))


def test_intact_shards_read_completely(small):
    """The checks pass on the shards as written, and every sample comes back unchanged."""
    root, manifest, train, dev = small
    got = list(eval_impressions(root, "dev"))
    assert [s.impression_id for s in got] == [x[0] for x in dev[0]]
    for s, (_, hist, cand, label) in zip(got, dev[0]):
        assert s.hist.tolist() == hist.tolist() and s.cand.tolist() == cand.tolist()
        assert s.labels.tolist() == label.astype(np.float32).tolist()
    clicks = sum(int(x[3].sum()) for shard in train for x in shard)
    assert sum(int(b.sample_mask.sum()) for b in loader(root)) == clicks


def test_iter_shard_checks_count_and_hash_only_against_an_entry(small, tmp_path):
    root, manifest, _, dev = small
    shard = root / "shards/dev-000000.tar"
    entry = P.shards(root, manifest, "dev")[0]
    assert len(list(iter_shard(shard, entry))) == 4
    wrong = P.Shard(shard, "0" * 64, 4, entry.clicks)
    with pytest.raises(DataError, match="differs from the manifest's 0000"):
        list(iter_shard(shard, wrong))
    assert len(list(iter_shard(shard))) == 4  # no entry: the tar structure alone


# --------------------------------------------------------------------------- one manifest reader


def test_missing_split_is_one_data_error_everywhere(small):
    root, manifest, _, _ = small
    want = rf"{root / 'manifest.json'}: no split 'nope'; prepared splits: \['dev', 'train'\]"
    with pytest.raises(DataError, match=want):
        list(eval_impressions(root, "nope"))
    with pytest.raises(DataError, match=want):
        loader(root, split="nope")
    with pytest.raises(DataError, match=want):
        P.split_info(manifest, "nope", root)
    with pytest.raises(DataError, match="manifest.json: no split 'nope'"):
        epoch_plan(manifest, 1, 0, 0, split="nope")


def test_labeled_iff_the_manifest_says_so(small):
    root, manifest, _, dev = small
    assert P.is_labeled(manifest, "dev") and P.is_labeled(manifest, "train")
    m = json.loads((root / "manifest.json").read_text())
    del m["splits"]["dev"]["labeled"]  # not said: unlabeled (no guess from the split's name)
    m["splits"]["train"]["labeled"] = False
    (root / "manifest.json").write_text(json.dumps(m))
    assert not P.is_labeled(m, "dev") and not P.is_labeled(m, "train")
    assert [s.labels.tolist() for s in eval_impressions(root, "dev")] == [
        [0.0] * len(x[2]) for x in dev[0]
    ]
    with pytest.raises(DataError, match=r"manifest.json: split 'train' has no labels"):
        loader(root)


def test_manifest_shard_entry_needs_its_hash(small):
    root, _, _, _ = small
    m = json.loads((root / "manifest.json").read_text())
    del m["splits"]["dev"]["shards"][0]["sha256"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"splits.dev.shards\[0\]: expected key 'sha256'"):
        list(eval_impressions(root, "dev"))


def test_vocab_names_and_fingerprint(tmp_path):
    (tmp_path / "vocab").mkdir()
    cats = ["<unk>", "sports"]
    ents = [{"id": "<none>"}, {"id": "Q90", "surface": "Paris", "type": "G"}]
    (tmp_path / "vocab/category.json").write_text(json.dumps(cats))
    (tmp_path / "vocab/entities.json").write_text(json.dumps(ents))
    assert P.vocab_names(tmp_path) == {"category": cats, "entities": ["", "Paris"]}
    (tmp_path / "vocab/subcategory.json").write_text('["<unk>"]')
    import hashlib

    h = hashlib.sha256()
    for name in ("category", "subcategory", "entities"):
        h.update(name.encode() + b"\0" + (tmp_path / f"vocab/{name}.json").read_bytes())
    assert P.vocab_fingerprint(tmp_path) == h.hexdigest()
    (tmp_path / "vocab/category.json").write_text("[1,")
    with pytest.raises(DataError, match=r"vocab/category.json:1: expected JSON"):
        P.read_vocab(tmp_path, "category")


# --------------------------------------------------------------------------- prepare side


def _rewrite_behaviors(root: Path, split: str, imps) -> Path:
    from mtrec_dist.data import mind

    path = root / split / "behaviors.tsv"
    mind.write_behaviors(path, imps)
    return path


def test_impression_ids_are_carried_as_strings(tmp_path):
    write_dataset(tmp_path)
    _rewrite_behaviors(
        tmp_path,
        "test",
        [_imp("003", ["N1"], ["N4", "N5"], None), _imp("3", [], ["N3"], None),
         _imp("0", [], ["N5"], None)],
    )  # fmt: skip
    _rewrite_behaviors(tmp_path, "dev", [_imp("010", ["N4"], ["N5", "N1"], [1, 0])])
    cfg = make_cfg(tmp_path)
    prepare(cfg, progress=False, workers=1)
    out = cfg.prepared_dir
    assert [s.impression_id for s in eval_impressions(out, "test")] == ["003", "3", "0"]
    assert stdlib_keys(out / "shards/test-000000.tar") == ["003", "3", "0"]
    batch = next(iter(loader(out, split="dev", batch_size=2)))
    assert batch.impression_ids == ("010", "")  # one click, one padding sample


def test_repeated_impression_id_anywhere_in_a_split(tmp_path):
    write_dataset(tmp_path)
    path = _rewrite_behaviors(
        tmp_path,
        "dev",
        [_imp("10", ["N4"], ["N5", "N1"], [1, 0]), _imp("11", [], ["N1"], [1]),
         _imp("12", [], ["N5"], [1]), _imp("10", [], ["N4"], [1])],
    )  # fmt: skip
    with pytest.raises(DataError) as e:
        prepare(make_cfg(tmp_path), progress=False, workers=1)
    assert str(e.value) == (
        f"{path}:4: impression id '10' repeats the id of line 1: expected unique ids"
    )


@pytest.mark.parametrize("name", ["news.tsv", "behaviors.tsv"])
@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_source_file_is_an_error(tmp_path, name, content):
    write_dataset(tmp_path)
    path = tmp_path / "dev" / name
    path.write_text(content)
    what = "news" if name == "news.tsv" else "impression"
    with pytest.raises(DataError) as e:
        prepare(make_cfg(tmp_path), progress=False, workers=1)
    assert str(e.value) == f"{path}: no {what} lines: expected one line per {what} (file is empty)"


def test_writer_and_reader_share_member_names(tmp_path):
    """The shard members prepare writes are the ones the reader asks for."""
    write_dataset(tmp_path)
    cfg = make_cfg(tmp_path)
    prepare(cfg, progress=False, workers=1)
    for split, labeled in (("train", True), ("test", False)):
        names = {
            m.name.split(".", 1)[1]
            for m in members(cfg.prepared_dir / f"shards/{split}-000000.tar")
        }
        assert names == (set(P.SHARD_MEMBERS) if labeled else {P.HIST, P.CAND, P.USER})
        assert names == set(P.required_members(labeled, has_users=True))


def test_npy_payload_decodes_like_numpy(small):
    """Reference check of the offsets the damage tests use: the payload is the array."""
    root, _, _, dev = small
    shard = root / "shards/dev-000000.tar"
    key, _, cand, _ = dev[0][1]
    at, _ = _payload_offset(shard, f"{key}.cand.npy")
    raw = shard.read_bytes()[at : at + 4 * cand.size]
    assert np.frombuffer(raw, "<i4").tolist() == cand.tolist()
    m = [m for m in members(shard) if m.name == f"{key}.cand.npy"][0]
    arr = np.load(io.BytesIO(shard.read_bytes()[m.offset_data : m.offset_data + m.size]))
    assert arr.tolist() == cand.tolist()
