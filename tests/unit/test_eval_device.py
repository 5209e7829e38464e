"""The evaluator's device, on the CPU (docs/design.md §8.5): how ``eval.device`` resolves, the
workers and Ray resources per device, the bf16 autocast path, and ``eval.device=cpu`` /
overrides leaving the default results exactly as they were. The CUDA side is in
tests/integration/test_eval_gpu.py (``@pytest.mark.gpu``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mtrec_dist.config import ConfigError, load_config
from mtrec_dist.data.batch import NewsTable
from mtrec_dist.data.impressions import Impressions
from mtrec_dist.data.stream import eval_groups
from mtrec_dist.eval import engine, pool
from mtrec_dist.eval.engine import Engine, encode_autocast, encode_chunks
from mtrec_dist.eval.evaluate import evaluate, evaluate_model
from mtrec_dist.eval.pool import actor_options, device_workers, resolve_device
from mtrec_dist.eval.predict import predict
from mtrec_dist.eval.run_folder import load_run
from mtrec_dist.metrics import METRICS
from mtrec_dist.models.registry import build_model
from mtrec_dist.utils import sha256_file
from tests.integration.test_predict import copy_run, make_run

ROOT = Path(__file__).resolve().parents[2]
PER_PART = 40  # 100 dev impressions -> 3 parts


def _cuda(monkeypatch, available: bool, count: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ---------------------------------------------------------------- device and workers


def test_auto_is_cuda_exactly_when_cuda_is_available(monkeypatch):
    _cuda(monkeypatch, True, 2)
    assert resolve_device("auto") == "cuda"
    _cuda(monkeypatch, False)
    assert resolve_device("auto") == "cpu"


def test_cpu_is_cpu_even_on_a_gpu_node(monkeypatch):
    _cuda(monkeypatch, True, 8)
    assert resolve_device("cpu") == "cpu"
    assert device_workers("cpu", 3) == 3  # eval.num_workers, as before


def test_cuda_without_cuda_names_the_key_and_the_fix(monkeypatch):
    _cuda(monkeypatch, False)
    with pytest.raises(
        ConfigError, match=r"eval\.device=cuda.*eval\.device=auto or eval\.device=cpu"
    ):
        resolve_device("cuda")
    _cuda(monkeypatch, True, 1)
    assert resolve_device("cuda") == "cuda"


def test_an_unknown_device_is_refused():
    with pytest.raises(ConfigError, match="eval.device='tpu'"):
        resolve_device("tpu")


def test_one_worker_per_gpu_whatever_num_workers(monkeypatch):
    _cuda(monkeypatch, True, 4)
    assert [device_workers("cuda", k) for k in (1, 2, 16)] == [4, 4, 4]
    _cuda(monkeypatch, True, 1)
    assert device_workers("cuda", 8) == 1  # one GPU: the engine in this process, no Ray
    assert device_workers("cpu", 0) == 1


def test_actor_options_by_hand():
    # CPU: a CPU each, or an equal share where the cluster has fewer CPUs than workers
    assert actor_options("cpu", 2, 8.0) == {"num_cpus": 1.0}
    assert actor_options("cpu", 4, 2.0) == {"num_cpus": 0.5}
    assert "num_gpus" not in actor_options("cpu", 3, 1.0)
    # CUDA: one whole GPU per actor (Ray sets each one's CUDA_VISIBLE_DEVICES), CPUs as on CPU
    assert actor_options("cuda", 2, 16.0) == {"num_cpus": 1.0, "num_gpus": 1}
    assert actor_options("cuda", 8, 4.0) == {"num_cpus": 0.5, "num_gpus": 1}


def test_pool_hands_device_and_bf16_to_its_actors(monkeypatch):
    """The actors are built with the pool's device and bf16 and the options of
    :func:`actor_options` (a fake Ray records what it was asked)."""
    asked: dict = {}

    class FakeActorClass:
        def remote(self, *args):
            asked.setdefault("args", []).append(args)
            return object()

    class FakeRay:
        @staticmethod
        def is_initialized():
            return True

        @staticmethod
        def cluster_resources():
            return {"CPU": 16.0, "GPU": 2.0}

        @staticmethod
        def remote(**opts):
            asked["opts"] = opts
            return lambda cls: FakeActorClass()

    monkeypatch.setattr(pool, "_ray", lambda: FakeRay)
    p = pool.WorkerPool(2, Path("/runs/r"), "dev", lambda: None, device="cuda", bf16=True)
    assert len(p._start_actors()) == 2
    assert asked["opts"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert asked["args"] == [("/runs/r", "dev", "cuda", True)] * 2


# ---------------------------------------------------------------- bf16 autocast


def test_autocast_context_entered_exactly_when_asked():
    with encode_autocast(torch.device("cpu"), bf16=False):
        assert not torch.is_autocast_enabled("cpu")
    with encode_autocast(torch.device("cpu"), bf16=True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


class _Recorder(torch.nn.Module):
    """A bi-encoder stand-in: records whether autocast was on in ``encode_news``."""

    cross_encoder = False

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.autocast: list[bool] = []

    def encode_news(self, batch):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return batch.news_rows.float()[:, None] * self.w


def test_engine_encodes_under_autocast_only_with_bf16(tiny_data):
    prepared = tiny_data / "prepared"
    rows = np.arange(1, 6, dtype=np.int64)
    for bf16 in (False, True):
        model = _Recorder()
        done, vecs = Engine(model, prepared, "dev", bf16=bf16).encode(rows)
        assert model.autocast == [bf16]
        assert vecs.dtype == np.float32
        np.testing.assert_array_equal(vecs[:, 0], done.astype(np.float32))


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A tiny MTRec run folder (weights spread N(0, 1), as the prediction tests build it)."""
    base = tmp_path_factory.mktemp("evaldev")
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [f"data.root={tiny_data}", f"eval.impressions_per_part={PER_PART}"],
    )
    manifest = json.loads((cfg.prepared_dir / "manifest.json").read_text())
    return make_run(base, cfg, manifest, "run")


@pytest.fixture(scope="module")
def scaled_run(run):
    """``run`` with its N(0, 1) matrices scaled by fan_in**-0.5 (a well-conditioned network:
    the N(0, 1) ones saturate the attention softmaxes, so a bf16 rounding there can move a
    vector by half its norm, which says nothing about bf16 on a trained model)."""
    new = copy_run(run, "scaled")
    weights = new / "export/model.safetensors"
    state = load_file(str(weights))
    for name, p in state.items():
        if p.dim() > 1 and "LayerNorm" not in name and p.is_floating_point():
            state[name] = p * p.shape[-1] ** -0.5
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    meta = json.loads((new / "export/meta.json").read_text())
    meta["model_sha256"] = sha256_file(weights)
    (new / "export/meta.json").write_text(json.dumps(meta))
    return new


def _vectors(run: Path, bf16: bool) -> np.ndarray:
    """Every news row's vector (row 0, the empty title, left out), encoded in chunks of 64."""
    model, cfg, *_ = load_run(run)
    eng = Engine(model, cfg.prepared_dir, "dev", bf16=bf16)
    rows = np.arange(1, len(eng.table), dtype=np.int64)
    parts = [eng.encode(chunk) for chunk in encode_chunks(eng.table, rows, 64)]
    out = np.zeros((len(eng.table), parts[0][1].shape[1]), np.float32)
    for done, vecs in parts:
        out[done] = vecs
    return out[1:]


# bf16 keeps 8 significant bits: one rounding moves a value by at most 2**-9 relative. The
# tiny encoder (2 layers) rounds each matmul operand once; the bound allows 8 such roundings
# to add up along one path (the measured worst case is about 0.007, 3.7 roundings).
BF16_EPS = 8 * 2**-9


def test_bf16_vectors_are_the_fp32_ones_within_bf16_rounding(scaled_run):
    """The vectors differ from fp32 (the autocast path is really taken) by at most a few
    bf16 roundings (:data:`BF16_EPS`, relative to each vector's norm)."""
    fp32 = _vectors(scaled_run, bf16=False)
    bf16 = _vectors(scaled_run, bf16=True)
    assert not np.array_equal(fp32, bf16)
    rel = np.linalg.norm(bf16 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    assert rel.max() < BF16_EPS, rel.max()


def _scores(run: Path, split: str = "dev") -> np.ndarray:
    parts = sorted((run / "eval" / split / "parts").glob("part-*.npz"))
    return np.concatenate([np.load(p)["scores"] for p in parts])


def test_device_cpu_equals_the_default_exactly(run, tmp_path):
    """``eval.device=cpu`` is the default path, byte for byte: its parts are the default's
    (same keys, reused), and a fresh folder scored with it writes the same prediction file."""
    base = evaluate(run, "dev", num_workers=1)
    ref_scores = _scores(run)
    ref_pred = predict(run, "dev", out=tmp_path / "a.zip", num_workers=1).read_bytes()
    again = evaluate(run, "dev", num_workers=1, overrides=["eval.device=cpu"])
    assert again["device"] == base["device"] == "cpu" and "bf16" not in again
    assert again["news_encoded"] == 0 and again["parts_scored"] == 0
    assert all(again[m] == base[m] for m in METRICS)
    fresh = copy_run(run, "fresh")
    predict(fresh, "dev", out=tmp_path / "b.zip", num_workers=1, overrides=["eval.device=cpu"])
    assert (tmp_path / "b.zip").read_bytes() == ref_pred
    np.testing.assert_array_equal(_scores(fresh), ref_scores)


def test_bf16_scores_within_the_rounding_bound_and_cached_apart(scaled_run):
    """``eval.bf16=true``: vectors in their own cache file, parts under their own key (so
    neither is reused by an fp32 call), and every score within the bound the vectors' bound
    gives. Score ``s = scale * r . u`` with ``u`` a convex combination of history vectors:
    with ``|r' - r| <= eps |r|`` for every vector, ``|s' - s| <= scale * R**2 * eps * (2 +
    eps)``, ``R`` the largest vector norm."""
    run = scaled_run
    ref = evaluate(run, "dev", num_workers=1)
    ref_scores = _scores(run)
    (vec_path,) = (run / "eval/dev").glob("news_vectors-*.npy")
    half = evaluate(run, "dev", num_workers=1, overrides=["eval.bf16=true"])
    assert half["bf16"] is True and half["news_encoded"] == ref["news_needed"]
    assert half["parts_scored"] == half["parts"]  # the fp32 parts were not taken
    assert sorted(p.name for p in (run / "eval/dev").glob("news_vectors-*.npy")) == sorted(
        [vec_path.name, vec_path.stem + "-bf16.npy"]
    )
    model, *_ = load_run(run)
    r = np.load(vec_path)
    bound = model.score_scale * np.max(np.sum(r * r, axis=1)) * BF16_EPS * (2 + BF16_EPS)
    diff = np.abs(_scores(run) - ref_scores)
    assert 0 < diff.max() <= bound, (diff.max(), bound)
    # back to fp32: its vectors still cached, the parts rescored to the same bytes
    back = evaluate(run, "dev", num_workers=1)
    assert back["news_encoded"] == 0 and back["parts_scored"] == back["parts"]
    np.testing.assert_array_equal(_scores(run), ref_scores)


def test_vectors_gathered_on_the_device_score_the_same(run):
    """The GPU's batched path (vectors copied to the device once, gathered there per batch,
    copied again when replaced) taken on the CPU: the same scores as the numpy gather, bit
    for bit (same values, same kernels). NRMS: a model without a fast scorer."""
    cfg = load_config(run / "config.yaml", ["model.name=nrms"])
    manifest = json.loads((cfg.prepared_dir / "manifest.json").read_text())
    torch.manual_seed(0)
    model = build_model(cfg, manifest)
    imps = Impressions.concat(list(eval_groups(cfg.prepared_dir, "dev")))
    table_rows = len(NewsTable(cfg.prepared_dir))
    dim = Engine(model, cfg.prepared_dir, "dev").encode(np.array([1]))[1].shape[1]
    rng = np.random.default_rng(0)
    out = {}
    for on_device in (False, True):
        eng = Engine(model, cfg.prepared_dir, "dev")
        eng.gather_on_device = on_device
        for k in range(2):  # a second set of vectors replaces the first
            vecs = rng.standard_normal((table_rows, dim)).astype(np.float32)
            eng.set_vectors(None, vecs)
            out[on_device, k] = eng.score_many(imps)
        rng = np.random.default_rng(0)
    for k in range(2):
        np.testing.assert_array_equal(out[True, k], out[False, k])
    assert not np.array_equal(out[True, 0], out[True, 1])


def test_overrides_change_eval_keys_only(run):
    with pytest.raises(ConfigError, match="only eval"):
        load_run(run, ["trainer.lr=1.0"])
    _, cfg, *_ = load_run(run, ["eval.bf16=true", "eval.device=cpu"])
    assert cfg.eval.bf16 is True and cfg.eval.device == "cpu"


def test_evaluate_model_bf16_flag_reaches_the_encoder(run, monkeypatch):
    """The trainer's in-memory evaluation encodes on its model's device, under autocast
    exactly when ``bf16`` (recorded), and fp32 by default: equal to the run's evaluation."""
    seen: list[tuple[str, bool]] = []
    real = engine.encode_autocast

    def recorded(device, bf16):
        seen.append((device.type, bf16))
        return real(device, bf16)

    monkeypatch.setattr(engine, "encode_autocast", recorded)
    model, cfg, *_ = load_run(run)
    a = evaluate_model(model, cfg.prepared_dir, "dev")
    assert seen and set(seen) == {("cpu", False)}
    seen.clear()
    c = evaluate_model(model, cfg.prepared_dir, "dev", bf16=True)
    assert seen and set(seen) == {("cpu", True)}
    assert c["news_encoded"] == a["news_encoded"]
