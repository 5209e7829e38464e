"""Ensembles: ``mtrec predict``/``mtrec evaluate`` with several ``--run`` folders (UNBERT-en4 style).

What the driver (:func:`mtrec_dist.eval.driver.score_split`) needs to treat several runs as one:
the check that they can be averaged, and the merge of their scored parts. Each run's scores come
from its own resumable steps (cached index, news vectors and part files in
``RUN/eval/<split>/``, docs/design.md §8.3), one run after another, so a restart redoes nothing
and a run already evaluated or predicted on the split costs only a read. The runs' scores are
then merged impression by impression:

* **the ensemble score of a candidate is the plain mean of the runs' raw scores** (in float64,
  summed in the order the runs were given), as UNBERT-en4 averages its four models. Raw scores
  rather than per-impression normalised ones: ranks only depend on each impression's scores, and
  runs of one family (the ensembles we build: seeds of one config) score on the same scale; a
  member whose scores span a wider range weighs more, which is the usual score-averaging
  behaviour, documented here rather than hidden;
* the mean is ranked with the one tie rule of everything else
  (:func:`mtrec_dist.metrics.ranks_of`: descending, a tie in candidate order), so the
  ensemble's dev metrics equal ``mtrec score`` of its prediction file.

Runs are refused **before any scoring** unless they read the same data the same way: one prepared
folder (so one split, one news table) and one tokenizer fingerprint; the error names both runs
and what differs. Each run is also checked against the data as a single run is
(:mod:`mtrec_dist.eval.run_folder`).

This module sits below the driver and knows nothing of workers or run folders' parts: it sees
configs and streams of part arrays.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtrec_dist.config import ConfigError, load_config
from mtrec_dist.eval.engine import data_key
from mtrec_dist.eval.run_folder import (
    check_run_tokenizer,
    check_run_vocab,
    read_manifest,
    run_tokenizer,
    split_info,
)

MERGED = ("ids", "sizes", "scores", "labels")  # the per-part arrays an ensemble merges
COMBINE = "mean of raw scores"  # how the runs' scores are combined, as the records say


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


class _ScoredStream:
    """A run's scored parts read as one stream of scored impressions: ``take(n)`` gives the
    next ``n`` (the runs' parts need not have the same bounds: eval.impressions_per_part may
    differ)."""

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


def mean_parts(
    runs: Sequence[Path], parts: Sequence[Iterator[dict[str, np.ndarray]]]
) -> Iterator[dict[str, np.ndarray]]:
    """The first run's parts (``parts[i]`` is run ``i``'s stream, in order) with ``scores``
    replaced by the mean of every run's scores (float64); the other runs' impressions (and
    labels, when labeled) must match. ``runs`` name the streams in errors."""
    readers = [_ScoredStream(p) for p in parts[1:]]
    for d in parts[0]:
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
        d["scores"] = total / len(parts)
        yield d
