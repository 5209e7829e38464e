"""Pretrained vectors: MIND entity_embedding.vec / GloVe text files, prepare's coverage report,
AMF with TransE entity vectors (unknown entity -> one learned default row), errors naming the
file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtrec_dist.data.tables import DataError
from mtrec_dist.data.vectors import entity_matrix, read_vectors, word_matrix
from mtrec_dist.models.encoders import MultiFieldFusion
from mtrec_dist.models.user import masked_softmax


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_mind_and_glove_formats(tmp_path):
    mind = _write(tmp_path / "e.vec", ["Q1\t0.5\t-1.0\t", "Q2\t2\t3\t", "Q1\t9\t9\t"])
    glove = _write(tmp_path / "g.txt", ["the 0.1 0.2", "cat -1 1.5", "", "dog 3 4"])
    got = read_vectors(mind)
    assert sorted(got) == ["Q1", "Q2"]
    np.testing.assert_array_equal(got["Q1"], [0.5, -1.0])  # first occurrence wins
    got = read_vectors(glove, keys={"cat", "dog", "zebra"})
    assert sorted(got) == ["cat", "dog"]
    np.testing.assert_array_equal(got["cat"], np.array([-1, 1.5], np.float32))


@pytest.mark.parametrize(
    "lines, line, what",
    [
        (["Q1\t1\t2", "Q2\t1", "Q3\t1\t2"], 2, "expected 2 numbers after the key, got 1"),
        (["Q1 1 2", "Q2 1 2", "Q3 1 x"], 3, "not a number in the vector of 'Q3'"),
        (["Q1"], 1, "expected a key followed by numbers"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, lines, line, what):
    p = _write(tmp_path / "bad.vec", lines)
    with pytest.raises(DataError) as e:
        read_vectors(p)
    assert str(e.value).startswith(f"{p}:{line}: ") and what in str(e.value)


def test_missing_file_and_wrong_width_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.vec")):
        read_vectors(tmp_path / "nope.vec")
    p = _write(tmp_path / "w.txt", ["a 1 2 3"])
    with pytest.raises(DataError) as e:
        read_vectors(p, dim=300)
    assert str(e.value) == f"{p}:1: expected 300 numbers after the key, got 3"


def test_entity_matrix_coverage(tmp_path):
    a = _write(tmp_path / "train.vec", ["Q2\t1\t1\t", "Q9\t5\t5\t"])
    b = _write(tmp_path / "dev.vec", ["Q2\t7\t7\t", "Q3\t2\t0\t"])
    mat, info = entity_matrix([a, b], ["<none>", "Q2", "Q3", "Q4"])
    assert info == {
        "files": [str(a), str(b)],
        "dim": 2,
        "entities": 3,
        "with_vector": 2,
        "without_vector": 1,
    }
    assert np.isnan(mat[0]).all() and np.isnan(mat[3]).all()
    np.testing.assert_array_equal(mat[1:3], [[1, 1], [2, 0]])  # train's Q2 wins over dev's


def test_word_matrix_matches_pieces(tmp_path):
    p = _write(tmp_path / "glove.txt", ["paris 1 0", "ing 0 1", "Rome 2 2"])
    mat, found = word_matrix(p, ["[PAD]", "Paris", "##ing", "Rome", "xyz"], 2)
    assert found.tolist() == [False, True, True, True, False]
    np.testing.assert_array_equal(mat, [[0, 0], [1, 0], [0, 1], [2, 2], [0, 0]])


def test_synth_writes_vectors_and_prepare_reports_coverage(tiny_data):
    """Coverage in the manifest equals a count made from the raw files; the aligned matrix holds
    the file's vectors at the vocabulary rows."""
    prepared = tiny_data / "prepared"
    manifest = json.loads((prepared / "manifest.json").read_text())
    cov = manifest["news"]["entity_vectors"]
    vocab = [d["id"] for d in json.loads((prepared / "vocab" / "entities.json").read_text())]
    in_files: dict[str, list[float]] = {}
    for split in ("train", "dev", "test"):
        for line in (tiny_data / split / "entity_embedding.vec").read_text().splitlines():
            k, *v = line.rstrip("\t").split("\t")
            assert len(v) == 100
            in_files.setdefault(k, [float(x) for x in v])
    have = [e for e in vocab[1:] if e in in_files]
    assert cov["dim"] == 100 and cov["entities"] == len(vocab) - 1
    assert cov["with_vector"] == len(have) and cov["without_vector"] == len(vocab) - 1 - len(have)
    assert 0 < cov["without_vector"] < cov["with_vector"]  # both kinds exist in the demo data
    mat = np.load(prepared / "vocab" / "entity_vectors.npy")
    i = vocab.index(have[0])
    np.testing.assert_array_equal(mat[i], np.float32(in_files[have[0]]))
    missing = [j for j, e in enumerate(vocab) if j > 0 and e not in in_files]
    assert np.isnan(mat[missing]).all()


def test_amf_with_entity_vectors_hand_computed():
    """Eq. 4 with pretrained entity rows: a known entity's row is its vector; an unknown one maps
    to the shared learned default (row 1); the fused vector matches a hand computation."""
    torch.manual_seed(0)
    D, Q, A = 4, 3, 2
    vecs = torch.tensor([[float("nan")] * 2, [1.0, 2.0], [float("nan")] * 2, [-1.0, 0.5]])
    f = MultiFieldFusion(D, Q, n_category=3, n_entity=4, amf_dim=A, entity_vectors=vecs).double()
    assert f.entity_row.tolist() == [0, 2, 1, 3]
    torch.testing.assert_close(f.entity_emb.weight[2:].float(), vecs[[1, 3]])
    title = torch.randn(2, D, dtype=torch.float64)
    category = torch.tensor([1, 2])
    entities = torch.tensor([[1, 2], [0, 0]])  # news 0: a known and an unknown entity; news 1: none
    out = f(title, category, entities)
    W = f.entity_emb.weight
    ent_mean = (W[2] + W[1]) / 2  # known row + learned default
    r_e = f.entity_proj(ent_mean)
    for u in range(2):
        r_c = f.category_proj(f.category_emb.weight[category[u]])
        fields = torch.stack([title[u], r_c, r_e])
        logits = torch.tanh(f.field_attention.proj(fields)) @ f.field_attention.query
        mask = torch.tensor([True, True, u == 0])
        w = masked_softmax(logits, mask)
        torch.testing.assert_close(out[u], (w[:, None] * fields).sum(0))
    out.sum().backward()
    g = f.entity_emb.weight.grad
    assert g[1].abs().sum() > 0 and g[2].abs().sum() > 0  # default row learns
    assert g[3].abs().sum() == 0 and g[0].abs().sum() == 0  # unused / padding


def test_amf_vector_width_must_match():
    vecs = torch.zeros(3, 100)
    with pytest.raises(ValueError, match=r"model.amf_dim=50"):
        MultiFieldFusion(4, 3, 2, 3, 50, entity_vectors=vecs)


def test_build_model_reads_prepared_vectors(tiny_cfg):
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.models.registry import build_model

    cfg = tiny_cfg("model.name=mtrec_amf")
    model = build_model(cfg, load_manifest(cfg.prepared_dir))
    mat = torch.from_numpy(np.load(cfg.prepared_dir / "vocab" / "entity_vectors.npy"))
    has = ~torch.isnan(mat).any(1)
    has[0] = False
    rows = model.fusion.entity_row
    torch.testing.assert_close(model.fusion.entity_emb.weight[rows[has]].detach(), mat[has])
    assert (rows[1:][~has[1:]] == 1).all()
