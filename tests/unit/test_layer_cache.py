"""model.train_layers: the frozen layers' per-news cache is exact (docs/design.md §3.1)."""

import json
import multiprocessing as mp
import os
import socket

import numpy as np
import pytest
import torch

from mtrec_dist.config import ConfigError
from mtrec_dist.data.batch import NewsTable
from mtrec_dist.data.prepared import load_manifest
from mtrec_dist.data.stream import train_loader
from mtrec_dist.models import layer_cache
from mtrec_dist.models.registry import build_model
from mtrec_dist.train.local import train_local


def _batch(cfg, n=8):
    return next(
        iter(
            train_loader(
                cfg.prepared_dir, rank=0, world_size=1, batch_size=n, epoch=0, seed=0,
                neg_k=4, history_len=10, loader_workers=0,
            )
        )
    )  # fmt: skip


def _pair(tiny_cfg, train_layers, *extra):
    """The full model and a copy of its weights with ``train_layers`` set, both in eval mode."""
    manifest = load_manifest(tiny_cfg().prepared_dir)
    torch.manual_seed(0)
    full = build_model(tiny_cfg(*extra), manifest).eval()
    part = build_model(tiny_cfg(f"model.train_layers={train_layers}", *extra), manifest)
    part.load_state_dict(full.state_dict())
    return full, part.eval()


def _scale_up(model):
    """Tiny random BERT vectors are near zero (every score ~0): make them large enough that a
    wrong layer or mask would show in the scores."""
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.mul_(4.0)


@pytest.mark.parametrize("train_layers", [1, 2, -1])
def test_cached_forward_equals_uncached_forward_in_eval_mode(tiny_cfg, train_layers):
    full, part = _pair(tiny_cfg, train_layers)
    _scale_up(full)
    part.load_state_dict(full.state_dict())
    batch = _batch(tiny_cfg())
    with torch.no_grad():
        ref = full(batch)
        live = part(batch)  # no cache: the frozen part computed
        assert layer_cache.attach(part, tiny_cfg().prepared_dir, progress=False) is not None
        cached = part(batch)
    real = torch.isfinite(ref.scores)
    assert ref.scores[real].abs().max() > 0.5  # the check below is not comparing zeros
    for out in (live, cached):
        torch.testing.assert_close(out.scores[real], ref.scores[real], rtol=0, atol=1e-6)
        for k, v in ref.losses.items():
            torch.testing.assert_close(out.losses[k], v, rtol=1e-6, atol=1e-6)
    # token states at every real token (padding positions are masked keys and never read)
    with torch.no_grad():
        _, h_ref = full.encoder(batch.tokens, batch.attention_mask)
        _, h_c = part.encoder(batch.tokens, batch.attention_mask, batch.news_rows)
    m = batch.attention_mask.bool()
    torch.testing.assert_close(h_c[m], h_ref[m], rtol=0, atol=1e-6)


def test_cache_rows_equal_the_frozen_part_title_by_title(tiny_cfg):
    """Each cached row == the frozen part run on that title alone (no batch, no padding)."""
    cfg = tiny_cfg("model.train_layers=1")
    torch.manual_seed(0)
    model = build_model(cfg, load_manifest(cfg.prepared_dir))
    cache = layer_cache.attach(model, cfg.prepared_dir, progress=False)
    table = NewsTable(cfg.prepared_dir)
    enc = model.encoder
    for row in (1, 2, 37, len(table) - 1):
        tok = torch.from_numpy(np.asarray(table.tokens[row], dtype=np.int64))
        n = int((tok != 0).sum())
        one = layer_cache.prefix_states(
            enc.bert, 1, tok[None, :n], torch.ones(1, n, dtype=torch.long)
        )
        torch.testing.assert_close(
            torch.from_numpy(np.array(cache.states[row, :n])), one[0], rtol=0, atol=1e-6
        )
        assert not cache.states[row, n:].any()  # zeros past the title's end
    meta = json.loads((cache.folder / "COMPLETE").read_text())
    assert meta["frozen_layers"] == 1 and meta["news"] == len(table)
    assert meta["bytes"] == cache.states.size * 4


def test_training_with_the_cache_equals_training_without_it(tiny_cfg, tmp_path, monkeypatch):
    """Same losses and weights after a few steps with the default dropout: the frozen part
    draws no random numbers whether it is computed or read."""
    over = ("model.train_layers=1", "trainer.max_steps=4", "trainer.log_every=0")
    a = tiny_cfg(*over, f"run_dir={tmp_path / 'cached'}")
    train_local(a, progress=False)
    monkeypatch.setattr(layer_cache, "attach", lambda *a, **k: None)
    b = tiny_cfg(*over, f"run_dir={tmp_path / 'live'}")
    train_local(b, progress=False)
    logs = [
        [json.loads(x) for x in (tmp_path / r / "train_log.jsonl").read_text().splitlines()]
        for r in ("cached", "live")
    ]
    for ra, rb in zip(*logs):
        for k in ("loss/main", "loss/category", "loss/ner"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "cached" / "export" / "model.safetensors")
    wb = load_file(tmp_path / "live" / "export" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    # the frozen part did not move; the trained top did
    torch.manual_seed(0)
    init = build_model(a, load_manifest(a.prepared_dir)).state_dict()
    frozen = "encoder.bert.encoder.layer.0.attention.self.query.weight"
    top = "encoder.bert.encoder.layer.1.attention.self.query.weight"
    torch.testing.assert_close(wa[frozen], init[frozen], rtol=0, atol=0)
    assert (wa[top] - init[top]).abs().max() > 0


CHUNK = 64  # news per chunk: several chunks on the tiny table


def _build_in_child(prepared, rank, world, q):
    import torch

    from mtrec_dist.config import load_config
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.models import layer_cache
    from mtrec_dist.models.registry import build_model

    torch.manual_seed(0)
    cfg = load_config(
        os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml"),
        [f"data.prepared={prepared}", "model.train_layers=1"],
    )
    model = build_model(cfg, load_manifest(prepared))
    c = layer_cache.build_cache(
        model.encoder, prepared, rank=rank, world=world, progress=False, chunk_rows=CHUNK
    )
    q.put(str(c.folder))


def test_two_processes_build_one_cache_and_an_interrupted_build_resumes(
    tiny_cfg, tmp_path, monkeypatch
):
    """Two processes share the build (disjoint chunks) and equal a one-process build; a build
    killed midway (chunks done, a claim held by a dead process) resumes to the same bytes."""
    import shutil

    src = tiny_cfg().prepared_dir
    ref_dir, par_dir, res_dir = (tmp_path / n for n in ("one", "two", "resumed"))
    for d in (ref_dir, par_dir, res_dir):
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("layer_cache"))
    cfg = tiny_cfg("model.train_layers=1")
    torch.manual_seed(0)
    model = build_model(cfg, load_manifest(src))
    ref = layer_cache.build_cache(model.encoder, ref_dir, progress=False, chunk_rows=CHUNK)
    n_chunks = -(-len(NewsTable(ref_dir)) // CHUNK)
    assert n_chunks >= 4

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(par_dir), r, 2, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    folders = {q.get(timeout=5), q.get(timeout=5)}
    assert len(folders) == 1
    folder = folders.pop()
    par = np.load(os.path.join(folder, "states.npy"), mmap_mode="r")
    np.testing.assert_array_equal(par, ref.states)
    chunks = os.path.join(folder, "chunks")
    builders = {
        open(os.path.join(chunks, f)).read() for f in os.listdir(chunks) if f.endswith(".done")
    }
    pids = {f"{socket.gethostname()} {p.pid}" for p in procs}
    assert builders and builders <= pids  # every chunk built by one of the two processes

    # interrupted build: half the chunks done, one claimed by a process that is gone
    key = layer_cache.cache_key(model.encoder.bert, 1, NewsTable(res_dir).tokens)
    folder = layer_cache.cache_folder(res_dir, key)
    (folder / "chunks").mkdir(parents=True)
    part = np.lib.format.open_memmap(folder / "states.npy", "w+", np.float32, ref.states.shape)
    for i in range(n_chunks // 2):
        part[i * CHUNK : (i + 1) * CHUNK] = ref.states[i * CHUNK : (i + 1) * CHUNK]
        (folder / "chunks" / f"{i:06d}.done").touch()
    part.flush()
    del part
    dead = mp.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    claim = folder / "chunks" / f"{n_chunks // 2:06d}.claim"
    claim.write_text(f"{socket.gethostname()} {dead.pid}")
    built = []
    real = layer_cache.prefix_states
    monkeypatch.setattr(
        layer_cache, "prefix_states", lambda *a: built.append(a[2].shape[0]) or real(*a)
    )
    res = layer_cache.build_cache(model.encoder, res_dir, progress=False, chunk_rows=CHUNK)
    np.testing.assert_array_equal(res.states, ref.states)
    assert sum(built) == len(NewsTable(res_dir)) - (n_chunks // 2) * CHUNK  # only the rest


def test_train_layers_refused_where_there_is_no_per_news_cache(tiny_cfg):
    manifest = load_manifest(tiny_cfg().prepared_dir)
    for extra, needle in (
        (("model.name=unbert",), "model.name=unbert"),
        (("model.name=nrms",), "model.name=nrms"),
        (("model.lora=true",), "model.lora=true"),
    ):
        with pytest.raises(ConfigError, match=needle):
            build_model(tiny_cfg("model.train_layers=1", *extra), manifest)
    with pytest.raises(ConfigError, match="has 2 layers"):
        build_model(tiny_cfg("model.train_layers=3"), manifest)
