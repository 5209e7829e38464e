"""Evaluator throughput: ``mtrec predict`` on a whole split, divided by the whole job.

    python bench/bench_eval.py --prepared /tmp/evalfast/prepared --split test --workers 2 \
        --out bench/results/eval.json

Target (issue 17): scoring + ranking + writing >= 10,000 impressions/s per core on the synthetic
``large`` test split (2,370,727 impressions, MIND-large's statistics), with a MiniLM-size MTRec.

**What it divides by.** The whole job after the news vectors exist: the **score** stage (the
workers read every part's impressions and score them) plus the **merge** (the driver reads the
part files, ranks every impression by the tie rule and writes the validated
``prediction.zip``). Two figures, side by side:

* ``impressions_per_s_per_core`` = impressions / ((score + merge wall seconds) x cores used),
  cores used = the workers (one torch thread each; the driver merges after they finish);
* ``impressions_per_cpu_s`` = impressions / CPU seconds of score + merge, summed over the
  driver and every worker process (what a loaded machine does not distort).

Reported apart, not divided by: the **index** pass (once per data: ids, candidate counts, the
news rows needed; cached across models), the **encode** stage (once per model; its counter
``news_encoded`` must equal the split's distinct news ``news_needed`` with
``max_encodes_per_news`` = 1), starting Ray, and each worker's model load.

What runs:

1. A run folder in a temporary directory (``--work``): an MTRec (``--encoder``, by default
   MiniLM-L6; ``--encoder-layers`` keeps its first layers to cut the encoding time) exported as
   ``mtrec train`` exports it, random heads, seeded.
2. ``mtrec_dist.eval.predict.predict(run, split, num_workers=--workers)``: index, encode every
   needed news once, score parts of ``--per-part`` impressions (default: at least 4 parts per
   worker, so every worker gets work), merge. Each stage's wall and CPU seconds come from the
   evaluator's own ``prediction.json``.
3. **factored vs general scoring** on one part in this process (CPU seconds): the factored
   MTRec scorer the evaluator uses against ``model.score_news_vectors`` in length-sorted
   batches (the path every other model takes), and their largest score difference.
4. **reading one part** in this process (CPU seconds): the evaluator's group reader
   (``read_part``: shard groups as flat arrays) against the same impressions read one
   ``Sample`` at a time and laid flat again (``eval_impressions`` + ``Impressions.from_samples``:
   what the evaluator did before it read groups).

Without ``--prepared`` the synthetic ``small`` data is generated and prepared first, and the
result says that it is not the large split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtrec_dist.config import Config  # noqa: E402
from mtrec_dist.eval import engine as E  # noqa: E402
from mtrec_dist.eval.predict import predict  # noqa: E402
from mtrec_dist.eval.run_folder import read_manifest  # noqa: E402
from mtrec_dist.utils import atomic_write_json, peak_rss_mb, say  # noqa: E402

LARGE_TEST_IMPRESSIONS = 2_370_727
TARGET_PER_CORE = 10_000.0  # impressions/s per core, scoring + ranking + writing
PARTS_PER_WORKER = 4  # the default part size gives every worker at least this many parts


def _say(msg: str) -> None:
    say(f"[bench_eval] {msg}", enabled=True)


def _prepare_small(work: Path) -> Path:
    from mtrec_dist.data.prepare import prepare
    from mtrec_dist.data.synthetic import generate

    raw, out = work / "raw", work / "prepared"
    generate(raw, scale="small", progress=False)
    cfg = Config()
    cfg.data.root, cfg.data.prepared = str(raw), str(out)
    cfg.data.impressions_per_shard = 1000
    prepare(cfg, progress=False)
    return out


def first_shards(prepared: Path, split: str, k: int, work: Path) -> Path:
    """A prepared folder whose ``split`` is the first ``k`` shards of ``prepared``'s (the news
    table, vocabularies and shard files linked, the manifest rewritten): a sample of a split
    with the same statistics, for a machine too slow or too loaded for the whole split."""
    out = work / "prepared-first-shards"
    out.mkdir()
    for name in ("news", "vocab", "shards"):
        (out / name).symlink_to(prepared / name)
    manifest = read_manifest(prepared)
    info = manifest["splits"][split]
    info["shards"] = info["shards"][:k]
    info["impressions"] = sum(int(sh["impressions"]) for sh in info["shards"])
    info["candidates"] = None  # unknown for the sample; the bench counts it from the index
    manifest["splits"] = {split: info}
    atomic_write_json(out / "manifest.json", manifest)
    return out


def _make_run(work: Path, prepared: Path, a: argparse.Namespace, per_part: int) -> Path:
    """A run folder holding an exported MTRec (random heads, seeded)."""
    from mtrec_dist.models.registry import build_model
    from mtrec_dist.train.export import export_run

    cfg = Config()
    cfg.data.prepared = str(prepared)
    cfg.model.encoder = a.encoder
    cfg.model.encoder_layers = a.encoder_layers
    cfg.eval.num_workers = a.workers
    cfg.eval.impressions_per_part = per_part
    cfg.run_dir = str(work / "run")
    manifest = read_manifest(prepared)
    torch.manual_seed(0)
    model = build_model(cfg, manifest).eval()
    export_run(model, cfg, manifest, step=0)
    return Path(cfg.run_dir)


def seed_vector_cache(run: Path, prepared: Path, split: str) -> None:
    """Random ``[N, D]`` news vectors under the key the evaluator computes: its encode stage
    is then a cache hit (scoring costs the same whatever the vectors' values)."""
    from mtrec_dist.utils import sha256_file

    sha = sha256_file(run / "export/model.safetensors")
    base = run / "eval" / split / f"news_vectors-{sha[:16]}"
    base.parent.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(prepared)
    n, d = (
        int(manifest["news"]["count"]),
        int(json.loads((run / "export/encoder/config.json").read_text())["hidden_size"]),
    )
    vecs = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    E.atomic_save_npy(base.with_suffix(".npy"), vecs)
    meta = {"model_sha256": sha, "data_key": E.data_key(manifest, split)}
    atomic_write_json(base.with_suffix(".json"), meta)


def _cpu() -> float:
    return time.process_time()


def _compare(n: int, fast: str, t_fast: float, slow: str, t_slow: float) -> dict:
    """Two ways of handling the same ``n`` impressions: CPU seconds, impressions per
    CPU-second, and how many times the first is faster (CPU times floored at 1 µs, below the
    clock's resolution, for tiny data)."""
    t_fast, t_slow = max(t_fast, 1e-6), max(t_slow, 1e-6)
    return {
        "impressions": n,
        f"{fast}_cpu_s": round(t_fast, 3),
        f"{slow}_cpu_s": round(t_slow, 3),
        f"{fast}_impressions_per_cpu_s": round(n / t_fast, 1),
        f"{slow}_impressions_per_cpu_s": round(n / t_slow, 1),
        "speedup": round(t_slow / t_fast, 2),
    }


def factored_vs_general(run: Path, prepared: Path, split: str, spec: E.PartSpec) -> dict:
    """CPU seconds of one part scored by the factored scorer and by the general path."""
    from mtrec_dist.eval.run_folder import load_run

    model, *_ = load_run(run)
    eng = E.Engine(model, prepared, split)
    vec = next((run / "eval" / split).glob("news_vectors-*.npy"))
    eng.set_vectors(vec)
    imps = E.read_part(prepared, split, spec)
    t0 = _cpu()
    fast = eng.score_many(imps)
    t_fast = _cpu() - t0
    if eng.factored is None:
        raise RuntimeError("the benchmark's model did not take the factored scorer")
    eng.factored, eng.factored_checked = None, True  # force the general path
    t0 = _cpu()
    general = eng.score_many(imps)
    t_general = _cpu() - t0
    return {
        **_compare(len(imps), "factored", t_fast, "general", t_general),
        "max_abs_score_difference": float(np.abs(fast - general).max()) if fast.size else 0.0,
        "max_abs_score": float(np.abs(general).max()) if general.size else 0.0,
        "note": "scoring only (no reading; the general path includes building its Samples), "
        "this process, one torch thread",
    }


def read_one_part(prepared: Path, split: str, spec: E.PartSpec) -> dict:
    """CPU seconds of reading one part: flat groups against one Sample per impression."""
    from itertools import islice

    from mtrec_dist.data.stream import Impressions, eval_impressions

    t0 = _cpu()
    flat = E.read_part(prepared, split, spec)
    t_groups = _cpu() - t0
    t0 = _cpu()
    samples = eval_impressions(prepared, split, shard_indices=list(spec.shards))
    per_imp = Impressions.from_samples(islice(samples, spec.skip, spec.skip + spec.count))
    t_samples = _cpu() - t0
    if not np.array_equal(per_imp.cand, flat.cand) or not np.array_equal(per_imp.ids, flat.ids):
        raise RuntimeError("the two readers differ on the benchmark's part")
    return {
        **_compare(len(flat), "group_reader", t_groups, "per_impression", t_samples),
        "note": "reading and checking one part (tar, sha256, ranges), this process",
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", help="prepared folder (default: synthetic small, generated)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--per-part", type=int, default=0, help="0: at most 50,000, >= 4 per worker")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--encoder-layers", type=int, default=0, help="0: all of the encoder's")
    ap.add_argument("--shards", type=int, default=0, help="only the split's first K shards")
    ap.add_argument(
        "--random-vectors",
        action="store_true",
        help="seed the news-vector cache with random vectors (no encoding; scoring cost is the same)",
    )
    ap.add_argument("--work", help="folder for the temporary run (default: system temp)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/eval.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("MTREC_QUIET", "1")  # library messages off; progress lines stay
    torch.set_num_threads(1)  # this process measures one worker's rates

    tmp = tempfile.TemporaryDirectory(prefix="bench_eval_", dir=a.work)
    work = Path(tmp.name)
    if a.prepared:
        prepared, source = Path(a.prepared).resolve(), f"prepared folder {a.prepared}"
    else:
        _say("generating + preparing synthetic small data")
        prepared, source = _prepare_small(work), "synthetic small (generated + prepared)"
    full = read_manifest(prepared)["splits"][a.split]
    if a.shards:
        prepared = first_shards(prepared, a.split, a.shards, work)
        source += f", first {a.shards} of its {len(full['shards'])} {a.split} shards"
    manifest = read_manifest(prepared)
    n_imp = int(manifest["splits"][a.split]["impressions"])
    workers = max(1, a.workers)
    per_part = a.per_part or max(1, min(50_000, math.ceil(n_imp / (PARTS_PER_WORKER * workers))))
    parts = math.ceil(n_imp / per_part)

    _say(f"building and exporting MTRec/{a.encoder} into a run folder")
    run = _make_run(work, prepared, a, per_part)

    if a.random_vectors:
        seed_vector_cache(run, prepared, a.split)
    ray_start = 0.0
    if workers > 1:
        import ray

        t0 = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=min(workers, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "MTREC_QUIET": "1"}},
        )
        ray_start = time.perf_counter() - t0

    _say(f"predict: {n_imp:,} impressions, {parts} parts on {workers} workers")
    os.environ.pop("MTREC_QUIET", None)  # the evaluator's progress lines, with ETA
    t0 = time.perf_counter()
    try:
        predict(run, a.split, out=work / "prediction.zip", num_workers=workers)
    finally:
        if workers > 1:
            import ray

            ray.shutdown()
    wall = time.perf_counter() - t0
    os.environ["MTREC_QUIET"] = "1"
    rec = json.loads((run / "eval" / a.split / "prediction.json").read_text())
    with np.load(next((run / "eval" / a.split).glob("index-*.npz"))) as z:
        n_cand = int(z["sizes"].sum())
    if a.random_vectors:
        if rec.get("cache") != "hit":
            raise RuntimeError(f"the seeded vector cache was not hit: {rec}")
    elif rec["news_encoded"] != rec["news_needed"] or rec["max_encodes_per_news"] != 1:
        raise RuntimeError(f"news not encoded exactly once: {rec}")
    sec, cpu = rec["seconds"], rec["cpu_seconds"]
    whole_wall = sec["score"] + sec["merge"]
    whole_cpu = cpu["score"] + cpu["merge"]
    per_core = n_imp / (whole_wall * workers)
    per_cpu = n_imp / whole_cpu

    _say("factored vs general scoring on one part (this process)")
    spec = E.plan_parts(manifest, a.split, min(per_part, 20_000))[0]
    side = factored_vs_general(run, prepared, a.split, spec)
    _say("reading one part: flat groups vs one Sample per impression (this process)")
    reading = read_one_part(prepared, a.split, spec)

    large = int(full["impressions"]) == LARGE_TEST_IMPRESSIONS
    res = {
        "benchmark": "eval",
        "source": source,
        "is_large_test_split": large,
        "whole_split": not a.shards,
        "split": a.split,
        "impressions": n_imp,
        "candidates": n_cand,
        "candidates_per_impression": round(n_cand / n_imp, 2),
        "model": f"mtrec, encoder {a.encoder}"
        + (f" (first {a.encoder_layers} layers)" if a.encoder_layers else "")
        + ", query_dim 200, random heads",
        "workers": workers,
        "cores_used": workers,
        "torch_threads_per_worker": 1,
        "impressions_per_part": per_part,
        "parts": parts,
        "divided_by": "score + merge: the workers reading and scoring every part, then the "
        "driver reading the parts, ranking (tie rule) and writing the validated prediction.zip; "
        "index, encoding, Ray start and model loading are reported apart",
        "impressions_per_s_per_core": round(per_core, 1),
        "impressions_per_cpu_s": round(per_cpu, 1),
        "target_impressions_per_s_per_core": TARGET_PER_CORE,
        "meets_target_per_core": per_core >= TARGET_PER_CORE,
        "meets_target_per_cpu_s": per_cpu >= TARGET_PER_CORE,
        "whole": {"wall_s": round(whole_wall, 3), "cpu_s": round(whole_cpu, 3)},
        "stage_wall_s": sec,
        "stage_cpu_s": cpu,
        "merge_wall_s": rec["merge_seconds"],
        "predict_call_wall_s": round(wall, 1),
        "ray_start_s": round(ray_start, 1),
        "news_needed": rec["news_needed"],
        "news_encoded": rec["news_encoded"],
        "max_encodes_per_news": rec.get("max_encodes_per_news", 0),
        "encode_titles_per_s": round(rec["news_encoded"] / max(sec["encode"], 1e-9), 1),
        "vectors": "random, seeded into the cache (--random-vectors: no encoding)"
        if a.random_vectors
        else "encoded by the model",
        "peak_rss_mb_per_worker": rec["worker_peak_rss_mb"],
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "factored_vs_general": side,
        "read_part": reading,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    if not large:
        res["note"] = "not the large split: rerun with --prepared on `mtrec synth --scale large`"
    elif a.shards:
        res["note"] = f"the large split's first {a.shards} shards only (--shards)"
    atomic_write_json(a.out, res)
    print(
        f"{n_imp:,} impressions: score + merge {whole_wall:,.1f} s wall on {workers} workers "
        f"({per_core:,.0f} impressions/s per core), {whole_cpu:,.1f} CPU s "
        f"({per_cpu:,.0f} per CPU-second); stages {sec}; encoded {rec['news_encoded']:,} of "
        f"{rec['news_needed']:,} news once -> {a.out}"
    )
    tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
