"""Ensembles: ``mtrec predict``/``mtrec evaluate`` with several ``--run`` folders (UNBERT-en4 style).

Each run's scores come from its own resumable steps (:func:`mtrec_dist.eval.driver.run_split`:
cached index, news vectors and part files in ``RUN/eval/<split>/``), one run after another, so a
restart redoes nothing and a run already evaluated or predicted on the split costs only a read.
The runs' scores are then merged impression by impression:

* **the ensemble score of a candidate is the plain mean of the runs' raw scores** (in float64,
  summed in the order the runs were given), as UNBERT-en4 averages its four models. Raw scores
  rather than per-impression normalised ones: ranks only depend on each impression's scores, and
  runs of one family (the ensembles we build: seeds of one config) score on the same scale; a
  member whose scores span a wider range weighs more, which is the usual score-averaging
  behaviour, documented here rather than hidden;
* the mean is ranked with the one tie rule of everything else
  (:func:`mtrec_dist.eval.metrics.ranks_of`: descending, a tie in candidate order), so the
  ensemble's dev metrics equal ``mtrec score`` of its prediction file.

Runs are refused **before any scoring** unless they read the same data the same way: one prepared
folder (so one split, one news table) and one tokenizer fingerprint; the error names both runs
and what differs. Each run is also checked against the data as a single run is
(:mod:`mtrec_dist.eval.run_folder`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtrec_dist.eval.driver import OnPart, SplitRun, iter_parts, result, run_split
from mtrec_dist.eval.engine import data_key
from mtrec_dist.eval.metrics import METRICS, ranked_impression_metrics, summarize
from mtrec_dist.utils import atomic_write_json, say

MERGED = ("ids", "sizes", "scores", "labels")  # the per-part arrays an ensemble merges


def as_runs(run_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    """One run folder or several -> a list of paths."""
    if isinstance(run_dir, (str, Path)):
        return [Path(run_dir)]
    runs = [Path(r) for r in run_dir]
    if not runs:
        raise ValueError("no run folder given")
    return runs


@dataclass
class _Member:
    run: Path
    cfg: Any
    manifest: dict
    tokenizer: dict
    prepared: Path


def check_ensemble(runs: Sequence[str | Path], split: str) -> None:
    """Refuse runs that cannot be averaged (ConfigError naming both runs and what differs):
    the same run twice, other prepared folders, other tokenizers; then each run against its
    data (tokenizer, vocabularies) as ``load_run`` does. Reads configs and metadata only."""
    from mtrec_dist.config import ConfigError, load_config
    from mtrec_dist.eval.run_folder import (
        check_run_tokenizer,
        check_run_vocab,
        read_manifest,
        run_tokenizer,
        split_info,
    )

    members: list[_Member] = []
    for run in map(Path, runs):
        cfg_path = run / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: missing; is {run} a run folder of `mtrec train`?")
        cfg = load_config(cfg_path)
        manifest = read_manifest(cfg.prepared_dir)
        split_info(manifest, split, cfg.prepared_dir)
        members.append(
            _Member(run, cfg, manifest, run_tokenizer(run, cfg), Path(cfg.prepared_dir).resolve())
        )
    first = members[0]
    seen = {first.run.resolve(): first.run}
    for m in members[1:]:
        if m.run.resolve() in seen:
            raise ConfigError(
                f"{m.run}: listed twice in the ensemble (as {seen[m.run.resolve()]}); each run "
                "counts once in the mean"
            )
        seen[m.run.resolve()] = m.run
        diffs = []
        ta, tb = first.tokenizer, m.tokenizer
        if ta.get("vocab_hash") != tb.get("vocab_hash"):
            diffs.append(
                f"tokenizer: {first.run} has {ta.get('name', '?')} (vocab_hash "
                f"{str(ta.get('vocab_hash'))[:16]}...), {m.run} has {tb.get('name', '?')} "
                f"(vocab_hash {str(tb.get('vocab_hash'))[:16]}...)"
            )
        if first.prepared != m.prepared:
            diffs.append(
                f"prepared folder: {first.run} reads {first.prepared}, {m.run} reads {m.prepared}"
            )
        elif data_key(first.manifest, split) != data_key(m.manifest, split):
            diffs.append(f"split {split!r}: the prepared folder changed between the two reads")
        if diffs:
            raise ConfigError(
                f"runs {first.run} and {m.run} cannot be ensembled: their scores are for other "
                "data or other token ids. Differences: " + "; ".join(diffs) + ". Ensemble runs "
                "trained with one encoder on one prepared folder (data.prepared)"
            )
    for m in members:
        check_run_tokenizer(m.run, m.cfg, m.manifest)
        check_run_vocab(m.run, m.cfg)


class _Impressions:
    """A run's parts read as a stream of impressions: ``take(n)`` gives the next ``n``
    (the runs' parts need not have the same bounds: eval.impressions_per_part may differ)."""

    def __init__(self, parts: Iterator[dict[str, np.ndarray]]):
        self.parts = parts
        self.buf: dict[str, np.ndarray] | None = None

    def take(self, n: int, where: str) -> dict[str, np.ndarray]:
        pieces = []
        while n > 0:
            if self.buf is None or self.buf["ids"].size == 0:
                try:
                    self.buf = {k: v for k, v in next(self.parts).items() if k in MERGED}
                except StopIteration:
                    raise RuntimeError(f"{where}: fewer impressions than the first run") from None
            k = min(n, int(self.buf["ids"].size))
            c = int(self.buf["sizes"][:k].sum())
            pieces.append(
                {key: v[:k] if key in ("ids", "sizes") else v[:c] for key, v in self.buf.items()}
            )
            self.buf = {
                key: v[k:] if key in ("ids", "sizes") else v[c:] for key, v in self.buf.items()
            }
            n -= k
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]} if pieces else {}


def ensemble_split(
    runs: Sequence[str | Path],
    split: str,
    num_workers: int | None,
    need_labels: bool,
    on_part: OnPart | None = None,
) -> list[SplitRun]:
    """Check the runs (nothing scored on a refusal), then steps 1-3 of each run in turn."""
    runs = [Path(r) for r in runs]
    check_ensemble(runs, split)
    done = [run_split(r, split, num_workers, need_labels, on_part) for r in runs]
    a = done[0].index
    for run, r in zip(runs[1:], done[1:]):
        if not (
            np.array_equal(a["ids"], r.index["ids"])
            and np.array_equal(a["sizes"], r.index["sizes"])
        ):
            raise RuntimeError(f"{runs[0]} and {run}: the split's impressions differ")
    return done


def iter_mean_parts(runs: Sequence[Path], done: list[SplitRun]) -> Iterator[dict[str, np.ndarray]]:
    """The first run's parts with ``scores`` replaced by the mean of every run's scores
    (float64); the other runs' impressions (and labels, when labeled) must match."""
    readers = [_Impressions(iter_parts(r)) for r in done[1:]]
    for d in iter_parts(done[0]):
        d = {k: v for k, v in d.items() if k in MERGED}
        total = d["scores"].astype(np.float64)
        for run, rd in zip(runs[1:], readers):
            o = rd.take(int(d["ids"].size), str(run))
            same = np.array_equal(o["ids"], d["ids"]) and np.array_equal(o["sizes"], d["sizes"])
            if same and "labels" in d:
                same = np.array_equal(o.get("labels"), d["labels"])
            if not same:
                raise RuntimeError(f"{runs[0]} and {run}: scored impressions differ")
            total += o["scores"]
        d["scores"] = total / len(done)
        yield d


def _record(runs: Sequence[Path], done: list[SplitRun], stats: dict) -> dict:
    out = dict(stats)
    out["runs"] = [str(r) for r in runs]
    out["combine"] = "mean of raw scores"
    out["per_run"] = [result(r, {"run": str(p)}) for p, r in zip(runs, done)]
    return out


def predict_ensemble(
    runs: Sequence[str | Path],
    split: str,
    out: str | Path,
    num_workers: int | None = None,
    on_part: OnPart | None = None,
) -> Path:
    """``prediction.zip`` of the runs' mean scores; the record goes next to it
    (``<out stem>.json``: runs, per-run workers/cache/timings)."""
    from mtrec_dist.eval.predict import merge_stages, write_ranks

    runs = [Path(r) for r in runs]
    done = ensemble_split(runs, split, num_workers, need_labels=False, on_part=on_part)
    idx = done[0].index
    t0 = time.perf_counter()
    merge: dict[str, float] = {}
    path = write_ranks(iter_mean_parts(runs, done), out, idx, merge)
    stats = {"split": split, "impressions": int(idx["ids"].size), "out": str(path)}
    total = time.perf_counter() - t0
    stats["seconds"] = {"merge": round(total, 3)}
    stats["merge_seconds"] = merge_stages(total, merge)
    atomic_write_json(path.with_name(path.stem + ".json"), _record(runs, done, stats))
    say(f"wrote {path} ({idx['ids'].size} impressions, mean of {len(runs)} runs)")
    return path


def evaluate_ensemble(
    runs: Sequence[str | Path],
    split: str = "dev",
    num_workers: int | None = None,
    on_part: OnPart | None = None,
) -> dict:
    """Dev metrics of the runs' mean scores under the tie rule (== ``mtrec score`` of
    :func:`predict_ensemble`'s file for the same runs and split). Writes no file."""
    runs = [Path(r) for r in runs]
    done = ensemble_split(runs, split, num_workers, need_labels=True, on_part=on_part)
    per = [
        ranked_impression_metrics(d["labels"], d["scores"], d["sizes"])
        for d in iter_mean_parts(runs, done)
    ]
    res = _record(runs, done, summarize(np.concatenate(per) if per else np.zeros((0, 4))))
    res["split"] = split
    res["candidates_missing_news"] = int(
        done[0].split_info.get("stats", {}).get("candidates_missing_news", 0)
    )
    say(f"{split} (mean of {len(runs)} runs): " + ", ".join(f"{m} {res[m]:.4f}" for m in METRICS))
    return res
