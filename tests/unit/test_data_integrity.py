"""Nothing silently lost or changed between the source files and the stream.

Shards are damaged by hand (cut at a member boundary, cut inside a member, one payload byte
changed, an impression dropped from an otherwise well-formed tar); every case must fail naming
the shard, and the impression where one is to blame. The prepare side gets hand-written MIND files with
a repeated impression id, zero-padded ids and empty files.
"""

from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mtrec_dist.data import prepared as P
from mtrec_dist.data.prepare import prepare
from mtrec_dist.data.shardfile import GROUP_MEMBER, ShardWriter, decode_group, iter_shard
from mtrec_dist.data.stream import epoch_plan, eval_impressions, train_loader
from mtrec_dist.data.tables import DataError
from tests.unit.test_prepare import _imp, make_cfg, write_dataset
from tests.unit.test_stream import N_NEWS, build_prepared, make_impressions

# --------------------------------------------------------------------------- damaged shards


@pytest.fixture
def small(tmp_path):
    """Train: 2 shards of 5 impressions; dev: 1 shard of 4 (every impression has a click);
    groups of 4 impressions per tar member."""
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


def stdlib_ids(path: Path) -> list[str]:
    """Impression ids as the standard library reads the shard (it takes a tar cut between
    members for a short one)."""
    with tarfile.open(path) as tf:
        return [i for m in tf.getmembers() for i in decode_group(tf.extractfile(m).read()).ids]


def loader(root: Path, **kw):
    args = dict(rank=0, world_size=1, batch_size=4, epoch=0, seed=0, loader_workers=0)
    return train_loader(root, **(args | kw))


def test_train_shard_cut_inside_a_member_says_truncated(small):
    root, _, train, _ = small
    shard = root / "shards/train-000000.tar"
    ms = members(shard)  # groups of 4: impressions 0-3, then 4
    cut(shard, ms[1].offset_data + 20)  # inside the second group's bytes
    with pytest.raises(DataError) as e:
        list(loader(root))
    assert str(e.value) == (
        f"{shard}: truncated: the file ends inside member {ms[1].name!r}; re-run `mtrec prepare`"
    )


@pytest.mark.parametrize("split", ["train", "dev"])
def test_shard_cut_at_a_member_boundary_says_truncated(small, split):
    root, manifest, train, dev = small
    # dev: one shard of 4 impressions; write it as groups of 2 so that it has a boundary
    if split == "dev":
        build_prepared(root / "dev2", {"dev": dev}, n_news=N_NEWS, group_size=2)
        root = root / "dev2"
    shard = root / f"shards/{split}-000000.tar"
    imps = (train if split == "train" else dev)[0]
    ms = members(shard)
    cut(shard, ms[1].offset)
    # the standard library reads it as a shorter shard: exactly the silent loss to refuse
    kept = 4 if split == "train" else 2
    assert stdlib_ids(shard) == [x[0] for x in imps[:kept]]
    with pytest.raises(DataError, match=rf"^{shard}: truncated: the file ends after member "
                       rf"'{ms[0].name}' without the tar end-of-archive marker"):  # fmt: skip
        if split == "train":
            list(loader(root))
        else:
            list(eval_impressions(root, "dev"))


def test_well_formed_shard_with_an_impression_less_is_counted(small):
    root, manifest, _, dev = small
    shard = root / "shards/dev-000000.tar"
    with ShardWriter(root, "dev", 3) as w:
        for iid, hist, cand, label in dev[0][:3]:
            w.write(iid, hist.tolist(), cand.tolist(), label.tolist(), 0)
    got = []
    with pytest.raises(DataError, match=rf"^{shard}: holds 3 impressions but the manifest says 4"):
        for s in eval_impressions(root, "dev"):
            got.append(s.impression_id)
    assert got == [x[0] for x in dev[0][:3]]  # read, then refused at the end of the shard


def _field_offset(shard: Path, imp: int, field: str) -> int:
    """File offset of impression ``imp``'s first ``field`` value ("hist", "cand", "label"),
    from the documented group layout: 32-byte header, int32 hist_len[n], cand_len[n], user[n],
    int32 hist[n_hist], int32 cand[n_cand], uint8 label[n_cand], ids."""
    data = shard.read_bytes()
    for m in members(shard):
        n, _, n_hist, n_cand = struct.unpack_from("<4I", data, m.offset_data + 8)
        if imp >= n:
            imp -= n
            continue
        lens = np.frombuffer(data, "<i4", 2 * n, m.offset_data + 32)
        hist_len, cand_len = lens[:n], lens[n:]
        base = m.offset_data + 32 + 12 * n
        if field == "hist":
            return base + 4 * int(hist_len[:imp].sum())
        base += 4 * n_hist
        if field == "cand":
            return base + 4 * int(cand_len[:imp].sum())
        return base + 4 * n_cand + int(cand_len[:imp].sum())
    raise IndexError(imp)


def test_changed_in_range_id_fails_the_sha256(small):
    root, manifest, _, dev = small
    shard = root / "shards/dev-000000.tar"
    key, _, cand, _ = dev[0][1]
    at = _field_offset(shard, 1, "cand")
    data = bytearray(shard.read_bytes())
    old = int(cand[0])
    new = old + 1 if old + 1 < N_NEWS else old - 1
    data[at : at + 4] = new.to_bytes(4, "little")  # still a valid news row
    shard.write_bytes(bytes(data))
    want = manifest["splits"]["dev"]["shards"][0]["sha256"]
    with pytest.raises(DataError, match=rf"^{shard}: sha256 [0-9a-f]{{64}} differs from the "
                       rf"manifest's {want}"):  # fmt: skip
        list(eval_impressions(root, "dev"))


def test_label_out_of_range_names_shard_and_impression(small):
    root, _, _, dev = small
    shard = root / "shards/dev-000000.tar"
    key, _, _, label = dev[0][2]
    at = _field_offset(shard, 2, "label")
    zero = int(np.flatnonzero(label == 0)[0]) if (label == 0).any() else 0
    data = bytearray(shard.read_bytes())
    data[at + zero] = 2  # a label flipped 0 -> 2
    shard.write_bytes(bytes(data))
    bad = label.tolist()
    bad[zero] = 2
    with pytest.raises(DataError) as e:
        list(eval_impressions(root, "dev"))
    assert str(e.value) == (
        f"{shard}: impression #2 (id {key!r}): labels {bad}: expected 0 or 1 per candidate"
    )


@pytest.mark.parametrize("field", ["cand", "hist"])
def test_id_out_of_range_names_shard_and_impression(small, field):
    root, _, train, _ = small
    shard = root / "shards/train-000001.tar"
    imps = train[1]
    # an impression of the second group (#4) for candidates, the first with a history for hist
    i = next(j for j, x in enumerate(imps) if x[1].size) if field == "hist" else 4
    key, hist, cand, _ = imps[i]
    at = _field_offset(shard, i, field)
    data = bytearray(shard.read_bytes())
    data[at + 3] ^= 0x01  # high byte of the first int32: row + 2**24
    shard.write_bytes(bytes(data))
    row = int((cand if field == "cand" else hist)[0]) + (1 << 24)
    lo = 0 if field == "cand" else 1
    with pytest.raises(DataError) as e:
        list(eval_impressions(root, "train", shard_indices=[1]))
    assert str(e.value) == (
        f"{shard}: impression #{i} (id {key!r}): {field} holds news row {row}, expected "
        f"{lo} <= row < {N_NEWS} (the news table's rows); re-run `mtrec prepare`"
    )
    with pytest.raises(DataError, match=rf"impression #{i} \(id '{key}'\): {field} holds news"):
        list(loader(root))


def test_intact_shards_read_completely(small):
    """The checks pass on the shards as written, and every impression comes back unchanged."""
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
    assert sum(len(g) for g in iter_shard(shard, entry)) == 4
    wrong = P.Shard(shard, "0" * 64, 4, entry.clicks)
    with pytest.raises(DataError, match="differs from the manifest's 0000"):
        list(iter_shard(shard, wrong))
    assert sum(len(g) for g in iter_shard(shard)) == 4  # no entry: the tar structure alone


def test_old_format_folder_says_re_run_prepare(small):
    root, _, _, _ = small
    m = json.loads((root / "manifest.json").read_text())
    m["format_version"] = 1  # one tar sample of .npy members per impression
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        list(eval_impressions(root, "dev"))
    assert str(e.value) == (
        f"{root / 'manifest.json'}: format_version 1: expected 2 (shards of impression groups); "
        "this folder was prepared by an older version: re-run `mtrec prepare`"
    )


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
    assert stdlib_ids(out / "shards/test-000000.tar") == ["003", "3", "0"]
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
    """The shard members prepare writes are the ones the reader decodes."""
    write_dataset(tmp_path)
    cfg = make_cfg(tmp_path)
    m = prepare(cfg, progress=False, workers=1)
    for split, labeled in (("train", True), ("test", False)):
        entry = m["splits"][split]["shards"][0]
        shard = cfg.prepared_dir / entry["path"]
        assert {m.name.split(".", 1)[1] for m in members(shard)} == {GROUP_MEMBER}
        groups = list(iter_shard(shard))
        assert all((g.labels is not None) == labeled for g in groups)
        assert sum(len(g) for g in groups) == entry["impressions"]


def test_documented_offsets_hold_the_arrays(small):
    """Reference check of the offsets the damage tests use: the bytes there are the arrays."""
    root, _, _, dev = small
    shard = root / "shards/dev-000000.tar"
    raw = shard.read_bytes()
    for i, (_, hist, cand, label) in enumerate(dev[0]):
        at = _field_offset(shard, i, "cand")
        assert np.frombuffer(raw[at : at + 4 * cand.size], "<i4").tolist() == cand.tolist()
        at = _field_offset(shard, i, "hist")
        assert np.frombuffer(raw[at : at + 4 * hist.size], "<i4").tolist() == hist.tolist()
        at = _field_offset(shard, i, "label")
        assert list(raw[at : at + label.size]) == label.tolist()
