"""What the benchmarks measure the same way: wall and CPU seconds side by side, batches from the
real training loader, and the slot and title counts they divide by.

Why CPU time beside wall time: on a shared machine the wall clock also counts the time other
processes held the cores, so a ratio of two wall-clock medians moves with the load (a surgery
ratio read 1.59-2.32x by wall clock where process CPU time read 1.69-1.71x). Process CPU time
(``time.process_time``: user + system seconds of every thread of this process) counts only the
work done. With T busy torch threads it is about T x the wall time on an idle machine, so CPU
figures are compared with CPU figures of the same thread count, never with wall figures.
Loader worker processes are not in it: the benchmarks that time models read batches in the
timing process (``loader_workers=0``), before the clock starts.

Why the real loader: a benchmark batch of full histories and titles of one fixed length
overstates the encoder's share of the step; batches drawn by
:func:`mtrec_dist.data.stream.train_loader` from a prepared folder carry the history lengths,
title lengths, repeats and padding the data has.

    from _common import Stopwatch, loader_batches, real_slots  # bench/ is on sys.path
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from mtrec_dist.data.batch import Batch

NO_SHARDS = (
    "the prepared folder has fewer train shards than ranks (or too few impressions for the "
    "steps asked); prepare it with a smaller data.impressions_per_shard"
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: benchmarks that start ``torch.distributed`` take one
    each, so two of them (or a test run) on the same machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stopwatch:
    """Wall and process CPU seconds of each ``with`` block, kept in lists.

    ``sync`` runs before each clock read (``torch.cuda.synchronize`` on a GPU, so queued
    kernels count against the block that launched them). The clocks are parameters so that a
    test can drive them by hand.
    """

    def __init__(
        self,
        sync: Callable[[], None] | None = None,
        wall: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.sync, self._wall, self._cpu = sync, wall, cpu
        self.wall_s: list[float] = []
        self.cpu_s: list[float] = []

    def __enter__(self) -> Stopwatch:
        if self.sync is not None:
            self.sync()
        self._w0, self._c0 = self._wall(), self._cpu()
        return self

    def __exit__(self, *exc) -> None:
        if self.sync is not None:
            self.sync()
        self.wall_s.append(self._wall() - self._w0)
        self.cpu_s.append(self._cpu() - self._c0)

    def summary(self, skip: int = 0) -> dict[str, float]:
        """Totals and medians of the blocks after the first ``skip`` (warm-up) ones."""
        w, c = self.wall_s[skip:], self.cpu_s[skip:]
        if not w:
            raise ValueError(f"no timed block after skipping {skip} warm-up block(s)")
        return {
            "blocks": len(w),
            "wall_s_total": sum(w),
            "cpu_s_total": sum(c),
            "wall_s_median": statistics.median(w),
            "cpu_s_median": statistics.median(c),
        }


def ratio(num: dict[str, float], den: dict[str, float]) -> dict[str, float]:
    """``num / den`` of two :meth:`Stopwatch.summary` results over the same batches: the ratio
    of totals (the headline figure: same work in both) and of medians, wall and CPU each."""
    return {
        f"{k}_ratio": num[k] / den[k]
        for k in ("cpu_s_total", "wall_s_total", "cpu_s_median", "wall_s_median")
    }


def real_slots(batch: Batch) -> int:
    """History + candidate slots of the real samples: what a batch without de-duplication
    encodes once per slot, padding slots and padding samples left out."""
    real = batch.sample_mask[:, None]
    return int((batch.hist_mask & real).sum() + (batch.cand_mask & real).sum())


def distinct_real_titles(batch: Batch) -> int:
    """Distinct news rows among the real slots. ``batch.num_titles`` (what the encoder runs
    on) is this plus the padding title (row 0) when any slot is padding and no real slot is
    row 0."""
    real = batch.sample_mask[:, None]
    rows = torch.cat(
        [
            batch.news_rows[batch.hist_idx[batch.hist_mask & real]],
            batch.news_rows[batch.cand_idx[batch.cand_mask & real]],
        ]
    )
    return int(rows.unique().numel())


def title_counts(batches: Iterable[Batch]) -> dict[str, float]:
    """Titles per real slot over ``batches``: ``encoded`` = titles the encoder runs on
    (``num_titles``: distinct rows, the padding title included), ``distinct`` = distinct news
    among the real slots, ``naive`` = 1 (a batch without de-duplication encodes each real slot
    once; its padding slots are not counted). Each is summed over the batches, then divided
    by the summed real slots."""
    samples = slots = encoded = distinct = n = 0
    for b in batches:
        n += 1
        samples += int(b.sample_mask.sum())
        slots += real_slots(b)
        encoded += b.num_titles
        distinct += distinct_real_titles(b)
    return {
        "batches": n,
        "real_samples": samples,
        "real_slots": slots,
        "real_slots_per_sample": slots / max(samples, 1),
        "encoded_per_real_slot": encoded / max(slots, 1),
        "distinct_per_real_slot": distinct / max(slots, 1),
        "naive_over_encoded": slots / max(encoded, 1),
    }


def batch_shape(batches: list[Batch]) -> dict[str, float]:
    """What the benchmark batches hold, per real sample and per encoded title, so a reader can
    check them against the data: real samples, real history slots per sample, titles encoded,
    real word pieces per title (attention mask) and the padded width L."""
    samples = sum(int(b.sample_mask.sum()) for b in batches)
    titles = sum(b.num_titles for b in batches)
    hist = sum(int((b.hist_mask & b.sample_mask[:, None]).sum()) for b in batches)
    pieces = sum(int(b.attention_mask.sum()) for b in batches)
    return {
        "batches": len(batches),
        "real_samples": samples,
        "real_history_per_sample": hist / max(samples, 1),
        "real_slots_per_sample": sum(real_slots(b) for b in batches) / max(samples, 1),
        "titles_encoded_per_batch": titles / max(len(batches), 1),
        "word_pieces_per_title": pieces / max(titles, 1),
        "padded_width_mean": sum(b.tokens.shape[1] for b in batches) / max(len(batches), 1),
    }


def loader_batches(
    prepared: str | Path,
    *,
    batch_size: int,
    n: int,
    history_len: int = 50,
    neg_k: int = 4,
    seed: int = 0,
    split: str = "train",
) -> list[Batch]:
    """The first ``n`` batches of epoch 0 of the training stream (one rank, read in this
    process), de-duplicated as the trainer sees them; padding-only batches are not taken."""
    from mtrec_dist.data.stream import train_loader

    loader = train_loader(
        prepared, rank=0, world_size=1, batch_size=batch_size, epoch=0, seed=seed,
        neg_k=neg_k, history_len=history_len, loader_workers=0, split=split,
    )  # fmt: skip
    out: list[Batch] = []
    for b in loader:
        if len(out) == n or not bool(b.sample_mask.any()):
            break
        out.append(b)
    if len(out) < n:
        raise ValueError(
            f"{prepared}: split {split!r} gives {len(out)} batches of {batch_size}, {n} asked"
        )
    return out
