"""What rank 0 shows a person: TensorBoard scalars, a progress line with ETA, the cosine plot.

TensorBoard tags (the keys of ``train/surgery.py`` and the engine's step statistics):
``loss/<task>``, ``grad/norm/<group>``, ``grad/coef/<group>``, ``grad/cos_before``,
``grad/cos_after``, ``grad/conflict_rate`` (share of steps so far with cos < 0), the
combined-gradient norms and cosines, ``mem/peak_mb``, ``mem/gpu_peak_mb`` (training on CUDA
only: ``torch.cuda.max_memory_allocated``), ``lr``, ``throughput/samples_per_s``,
``throughput/titles_per_s`` and ``dev/<metric>``; every scalar also goes to
``train_log.jsonl`` (dev metrics to ``dev_log.jsonl``). At the end ``cosine_trace.png`` plots cos(main, aux) before and after surgery
per step, like Figure 5 of the MTRec paper (Appendix B).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from mtrec_dist.config import Config, dump_config
from mtrec_dist.train import surgery
from mtrec_dist.train.console import ConsoleLog
from mtrec_dist.utils import Progress, atomic_write_text

DEV_LOG = "dev_log.jsonl"  # one line per periodic dev evaluation: {"step": s, "auc": ...}
TRAIN_LOG = "train_log.jsonl"  # one line per optimizer step: {"step": s, "lr": ..., ...}


def truncate_log(path: Path, last_step: int) -> None:
    """Keep only the records of ``path`` (JSON lines with a ``step``) up to ``last_step``,
    atomically; a torn last line (a crash mid-write) is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int) and step <= last_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def step_record(
    step: int,
    lr: float,
    losses: Mapping[str, Any],
    stats: Mapping[str, Any],
    head: Mapping[str, Any] | None = None,
) -> dict:
    """One optimizer step's line of :data:`TRAIN_LOG`: ``step``, ``lr``, ``head`` as given, the
    task losses as ``loss/<task>`` and every scalar of ``stats`` (the surgery's keys), as floats.

    Both trainers write their steps through this one function, so the distributed run's log and
    the single-process reference's compare key by key (docs/design.md §4.4).
    """
    rec: dict = {"step": step, "lr": lr, **(head or {})}
    for k, v in losses.items():
        rec[f"loss/{k}"] = float(v)  # a 0-d tensor (the loop) or a float (the reference)
    for k, v in stats.items():
        if isinstance(v, (int, float)):
            rec[k] = float(v)
    return rec


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]


class RunLogger:
    def __init__(self, cfg: Config, rank: int, total_steps: int, start_step: int = 0):
        self.dir = Path(cfg.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.dir / "config.yaml")
        # A resumed run (or a restarted worker) continues at start_step + 1: records past it
        # were written by the run that died and are replaced, not appended to (design.md §6).
        for name in (TRAIN_LOG, DEV_LOG):
            truncate_log(self.dir / name, start_step)
        self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=start_step + 1)
        self.every = max(cfg.trainer.log_every, 1)
        self.ckpt_every = cfg.trainer.checkpoint_every
        # Lines for a person go to RUN_DIR/console.log, which the driver prints (train/console.py).
        self.say = ConsoleLog(self.dir, echo=False)
        self.bar = Progress("train", total_steps, unit="steps", every=0.0, sink=self.say)
        self.bar.n = start_step
        self.cos: list[tuple[int, float, float]] = []
        self.conflicts = 0
        for rec in _records(self.dir / TRAIN_LOG):  # the steps kept: the trace goes on
            cb = rec.get(surgery.COS_BEFORE)
            if cb is not None:
                self.conflicts += cb < 0
                self.cos.append((rec["step"], cb, rec.get(surgery.COS_AFTER, cb)))
        self.jsonl = open(self.dir / TRAIN_LOG, "a", encoding="utf-8")  # noqa: SIM115
        self.dev_path = self.dir / DEV_LOG

    def step(self, step, losses, stats: dict, lr: float, samples: int, titles: int, secs: float):
        rec = step_record(step, lr, losses, stats)
        cb, ca = stats.get(surgery.COS_BEFORE), stats.get(surgery.COS_AFTER)
        if cb is not None:
            self.conflicts += cb < 0
            rec["grad/conflict_rate"] = self.conflicts / max(1, len(self.cos) + 1)
            self.cos.append((step, cb, ca if ca is not None else cb))
        rec["throughput/samples_per_s"] = samples / max(secs, 1e-9)
        rec["throughput/titles_per_s"] = titles / max(secs, 1e-9)
        for k, v in rec.items():
            if k != "step":
                self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.ckpt_every and step % self.ckpt_every == 0:  # on disk before the checkpoint
            self.tb.flush()
        self.bar.n = step - 1
        if step % self.every == 0:
            short = " ".join(f"{k[5:]}={v:.4f}" for k, v in rec.items() if k.startswith("loss/"))
            if cb is not None:
                short += f" cos={cb:+.3f}"
            self.bar.update(1, extra=f"{short} {rec['throughput/samples_per_s']:.1f} samples/s")
        else:
            self.bar.n = step

    def metrics(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"dev/{k}", v, step)
        rec = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        with open(self.dev_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        shown = ("auc", "mrr", "ndcg@5", "ndcg@10")
        self.say(
            f"dev @ step {step}: "
            + ", ".join(f"{k}={metrics[k]:.4f}" for k in shown if isinstance(metrics.get(k), float))
        )

    def close(self) -> None:
        self.bar.close()
        self.tb.flush()
        self.tb.close()
        self.jsonl.close()
        self.say.close()
        if self.cos:
            plot_cosine(self.cos, self.dir / "cosine_trace.png")


def plot_cosine(trace: list[tuple[int, float, float]], path: Path) -> None:
    import matplotlib  # lazy: only the end of a surgery run plots; ~0.7 s to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after use("Agg") (no display on workers)

    steps = [s for s, _, _ in trace]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, idx, title in ((axes[0], 1, "(a) before surgery"), (axes[1], 2, "(b) after surgery")):
        ys = [r[idx] for r in trace]
        ax.scatter(steps, ys, s=4, c=["tab:red" if y < 0 else "tab:blue" for y in ys])
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].set_ylabel("cos(g_main, g_aux)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
