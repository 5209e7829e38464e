"""``mtrec tune-deepspeed``: measure DeepSpeed settings on the real training step, pick the fastest.

Why not DeepSpeed's own autotuner: it calls ``exit()`` inside engines and knows nothing of the
multi-task surgery or of this project's YAML-owned batch arithmetic (dsconfig.OWNED_BY_YAML).
Instead every grid point of a small search space is run as its own short Ray Train run of the
real trainer (``run_training``: same model, data stream, surgery), so a trial that runs out of
memory or crashes only fails itself: the exception is recorded as a one-line reason and the
sweep goes on.

A trial runs ``warmup_steps + measure_steps`` optimizer steps with checkpointing and evaluation
off; its numbers are the means over the measured steps (after warm-up) of rank 0's
``train_log.jsonl``: ``throughput/samples_per_s``, ``throughput/titles_per_s`` and the step time
``global_batch / samples_per_s`` (the interval the trainer timed: loader + forward + backward +
surgery + optimizer step; exact for full batches). Peak memory is the largest ``mem/peak_mb``
logged (accelerator memory where there is one, else the worker's peak resident memory).

Grid points that would break DeepSpeed's batch-size arithmetic are rejected before they start
(``resolve_deepspeed`` plus the space's ``global_batch`` constraint), with the reason in the
table. Outputs under ``--out`` (all atomic, rewritten after every trial so a killed sweep keeps
its finished trials; a rerun with the same ``--out`` skips them):

- ``results.csv`` / ``results.md``: the ranked table (fitting trials by samples/s first);
- ``best_deepspeed.json``: the winner's DeepSpeed JSON, ``"auto"`` for the YAML-owned fields;
- ``best_command.txt``: the ``python launch/train.py ...`` line with the winner's
  ``trainer.micro_batch`` / ``trainer.grad_accum``;
- ``tune_state.json``: every finished trial (what a resume reads); ``trials/NNN/``: one run
  folder per started trial (its train_log.jsonl, config.yaml, deepspeed.json).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import math
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtrec_dist.config import (
    Config,
    ConfigError,
    load_config,
    parse_override,
    read_yaml_mapping,
    validate,
)
from mtrec_dist.data.prepared import load_manifest
from mtrec_dist.train.dsconfig import YAML_OWNED_DS, load_ds_json, resolve_deepspeed
from mtrec_dist.train.launch import run_training
from mtrec_dist.train.steps import StepPlan
from mtrec_dist.utils import atomic_write_json, atomic_write_text, say

# Dimensions a space may grid over, in the order the table shows them.
DIMENSIONS = (
    "zero_stage",
    "micro_batch",
    "grad_accum",
    "bf16",
    "offload_optimizer",
    "reduce_bucket_size",
    "overlap_comm",
)
SETTINGS = ("global_batch", "warmup_steps", "measure_steps", "max_trials", "memory_limit_mb")
OFFLOAD_CHOICES = ("none", "cpu")
STATE_FILE = "tune_state.json"
STATUS_ORDER = {"ok": 0, "did not fit": 1, "failed": 2, "rejected": 3}
CSV_COLUMNS = (
    "rank",
    "trial",
    "status",
    "fit",
    "zero_stage",
    "micro_batch",
    "grad_accum",
    "global_batch",
    "bf16",
    "offload_optimizer",
    "reduce_bucket_size",
    "overlap_comm",
    "samples_per_s",
    "titles_per_s",
    "step_time_s",
    "peak_mb",
    "wall_s",
    "reason",
    "run_dir",
)


# --------------------------------------------------------------------------- the space


@dataclass
class Space:
    """A parsed search space: the grid dimensions (file order) and the trial settings."""

    path: str
    dims: dict[str, list[Any]]
    global_batch: int | None = None
    warmup_steps: int = 2
    measure_steps: int = 3
    max_trials: int = 0  # 0 = the whole grid
    memory_limit_mb: float = 0.0  # 0 = no limit

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point, first dimension varying slowest; cut to ``max_trials`` points."""
        names = list(self.dims)
        points = [dict(zip(names, vals)) for vals in itertools.product(*self.dims.values())]
        return points[: self.max_trials] if self.max_trials > 0 else points


def _as_int(v: Any, where: str, key: str, minimum: int) -> int:
    # YAML 1.1 reads 5e7 (no dot) as a string: accept numeric strings that are whole numbers.
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}{key}: expected an integer >= {minimum}, got {v!r}")
    return v


def _check_value(key: str, v: Any, where: str) -> Any:
    if key == "zero_stage":
        if v not in (0, 1, 2, 3) or isinstance(v, bool):
            raise ConfigError(f"{where}{key}: expected 0, 1, 2 or 3, got {v!r}")
        return int(v)
    if key in ("micro_batch", "grad_accum", "reduce_bucket_size"):
        return _as_int(v, where, key, 1)
    if key in ("bf16", "overlap_comm"):
        if not isinstance(v, bool):
            raise ConfigError(f"{where}{key}: expected true or false, got {v!r}")
        return v
    if key == "offload_optimizer":
        if v not in OFFLOAD_CHOICES:
            raise ConfigError(
                f"{where}{key}: expected one of {', '.join(OFFLOAD_CHOICES)}, got {v!r}"
            )
        return v
    raise AssertionError(key)  # pragma: no cover - DIMENSIONS and this function agree


def load_space(path: str | Path) -> Space:
    """Parse a space YAML; unknown keys and bad values name the file, line and key."""
    path = Path(path)
    data, lines = read_yaml_mapping(path, f"--space {path}: no such file (see configs/tune/)")
    space = Space(path=str(path), dims={})
    for key, value in data.items():
        where = f"{path}:{lines.get(str(key), '?')}: "
        if key in DIMENSIONS:
            values = value if isinstance(value, list) else [value]
            if not values:
                raise ConfigError(f"{where}{key}: empty list; give at least one value")
            space.dims[key] = [_check_value(key, v, where) for v in values]
        elif key == "global_batch":
            space.global_batch = None if value is None else _as_int(value, where, key, 1)
        elif key == "warmup_steps":
            space.warmup_steps = _as_int(value, where, key, 0)
        elif key in ("measure_steps",):
            space.measure_steps = _as_int(value, where, key, 1)
        elif key == "max_trials":
            space.max_trials = _as_int(value, where, key, 0)
        elif key == "memory_limit_mb":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{where}{key}: expected a number of MiB >= 0, got {value!r}")
            space.memory_limit_mb = float(value)
        else:
            raise ConfigError(
                f"{where}unknown key '{key}' in the search space; allowed: "
                f"{', '.join(DIMENSIONS + SETTINGS)}"
            )
    return space


# --------------------------------------------------------------------------- trials


@dataclass
class Trial:
    """One grid point made concrete: the DeepSpeed JSON to run and the trainer overrides."""

    index: int
    params: dict[str, Any]
    ds: dict  # unresolved: "auto" for the YAML-owned fields
    micro_batch: int
    grad_accum: int | None  # None: no grad_accum gives the space's global_batch
    workers: int
    global_batch: int
    reject: str | None = None
    resolved: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.index:03d}"

    @property
    def key(self) -> str:
        return json.dumps(self.params, sort_keys=True)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())

    def columns(self) -> dict[str, Any]:
        """The effective settings (grid values or what the base config/JSON gives)."""
        z = self.ds.get("zero_optimization", {})
        return {
            "zero_stage": z.get("stage", 0),
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "global_batch": self.global_batch,
            "bf16": bool(self.ds.get("bf16", {}).get("enabled", False)),
            "offload_optimizer": z.get("offload_optimizer", {}).get("device", "none"),
            "reduce_bucket_size": z.get("reduce_bucket_size", ""),
            "overlap_comm": z.get("overlap_comm", ""),
        }


def trial_deepspeed(base_ds: dict, params: dict[str, Any]) -> dict:
    """The base DeepSpeed JSON with the grid point's settings written in, YAML fields "auto"."""
    ds = copy.deepcopy(base_ds)
    for k in YAML_OWNED_DS:
        ds[k] = "auto"
    zero = ds.setdefault("zero_optimization", {})
    if "zero_stage" in params:
        zero["stage"] = params["zero_stage"]
    if "bf16" in params:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": params["bf16"]}
    if "offload_optimizer" in params:
        if params["offload_optimizer"] == "none":
            zero.pop("offload_optimizer", None)
            ds.pop("zero_force_ds_cpu_optimizer", None)
        else:
            zero["offload_optimizer"] = {"device": params["offload_optimizer"]}
            # The YAML owns the optimizer (a client torch AdamW). DeepSpeed refuses that with
            # offload for speed reasons only; let it through so the real blocker (the fused
            # surgery keeps gradients in device memory, ds_engine.py) is what the table reports.
            ds["zero_force_ds_cpu_optimizer"] = False
    if "reduce_bucket_size" in params:
        zero["reduce_bucket_size"] = params["reduce_bucket_size"]
    if "overlap_comm" in params:
        zero["overlap_comm"] = params["overlap_comm"]
    return ds


def _trial_config(
    base: Config, ds_path: str, micro: int, ga: int, steps: int, epochs: int, run_dir: str
) -> Config:
    cfg = copy.deepcopy(base)
    cfg.deepspeed = ds_path
    cfg.run_dir = run_dir
    t = cfg.trainer
    t.micro_batch, t.grad_accum, t.max_steps, t.epochs = micro, ga, steps, epochs
    t.checkpoint_every = 0  # the trainer still saves one final checkpoint + export (loop.py)
    t.eval_every = 0
    t.max_failures = 0  # a trial that fails is a result, not something to retry
    validate(cfg)
    return cfg


def plan_trials(base: Config, space: Space, manifest: dict) -> list[Trial]:
    """Every grid point as a Trial; those that cannot run carry ``reject`` (a one-line reason)."""
    base_ds = load_ds_json(base.deepspeed)
    workers = base.trainer.num_workers
    steps = space.warmup_steps + space.measure_steps
    trials = []
    with tempfile.TemporaryDirectory(prefix="mtrec-tune-") as tmp:
        for i, params in enumerate(space.grid()):
            micro = params.get("micro_batch", base.trainer.micro_batch)
            ga = params.get("grad_accum", base.trainer.grad_accum)
            reject = None
            gb = space.global_batch
            if gb is not None and "grad_accum" not in params:
                if gb % (micro * workers):
                    reject = (
                        f"global_batch {gb} is not divisible by micro_batch {micro} x "
                        f"{workers} workers = {micro * workers}"
                    )
                    ga = None
                else:
                    ga = gb // (micro * workers)
            elif gb is not None and micro * ga * workers != gb:
                reject = (
                    f"micro_batch {micro} x grad_accum {ga} x {workers} workers = "
                    f"{micro * ga * workers} != global_batch {gb}"
                )
            glob = gb if gb is not None else micro * ga * workers
            ds = trial_deepspeed(base_ds, params)
            tr = Trial(i, params, ds, micro, ga, workers, glob, reject)
            if tr.reject is None and ga is not None:
                trial = replace(base.trainer, micro_batch=micro, grad_accum=ga)
                if StepPlan.of(manifest, workers, trial).steps_per_epoch < 1:
                    tr.reject = (
                        f"micro_batch {micro} x grad_accum {ga} is more than one worker's share "
                        "of the training clicks (no optimizer step per epoch)"
                    )
            if tr.reject is None:
                p = Path(tmp) / f"{tr.name}.json"
                p.write_text(json.dumps(tr.ds))
                try:
                    cfg = _trial_config(base, str(p), micro, ga, steps, 1, base.run_dir)
                    tr.resolved = resolve_deepspeed(cfg)
                except ConfigError as e:
                    tr.reject = str(e).replace(str(p), "trial JSON")
            trials.append(tr)
    return trials


# --------------------------------------------------------------------------- measuring


def summarize_log(path: str | Path, warmup: int, measure: int, global_batch: int) -> dict:
    """Means over the measured steps (``warmup < step <= warmup + measure``) of rank 0's log.

    A restarted step is counted once (its last record). Raises ValueError when the log is
    missing or holds fewer steps than the trial ran.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no train log was written")
    recs: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[int(r["step"])] = r
    want = range(warmup + 1, warmup + measure + 1)
    missing = [s for s in want if s not in recs]
    if missing:
        raise ValueError(f"{path}: steps {missing} were not logged (the run ended early)")
    sps = [recs[s]["throughput/samples_per_s"] for s in want]
    tps = [recs[s]["throughput/titles_per_s"] for s in want]
    peaks = [r["mem/peak_mb"] for r in recs.values() if "mem/peak_mb" in r]
    return {
        "samples_per_s": sum(sps) / len(sps),
        "titles_per_s": sum(tps) / len(tps),
        "step_time_s": sum(global_batch / max(x, 1e-12) for x in sps) / len(sps),
        "peak_mb": max(peaks) if peaks else float("nan"),
    }


_ERR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.+)$")


def failure_reason(exc: BaseException, limit: int = 300) -> str:
    """One line for the table: the innermost ``SomeError: message`` of a (Ray-wrapped) error."""
    inner: BaseException = exc
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        inner = failures[min(failures)]
    for attr in ("controller_failure", "cause"):
        nxt = getattr(inner, attr, None)
        if isinstance(nxt, BaseException):
            inner = nxt
    text = str(inner)
    hits = [m for m in map(_ERR_LINE.match, text.splitlines()) if m]
    if hits:
        name, msg = hits[-1].group(1).split(".")[-1], hits[-1].group(2)
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        name, msg = type(inner).__name__, first
    line = f"{name}: {msg}".strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _is_oom(reason: str) -> bool:
    r = reason.lower()
    # CUDA/torch OOM, or Ray's memory monitor killing a worker ("node running low on memory")
    return "out of memory" in r or "outofmemory" in r or "low on memory" in r


# --------------------------------------------------------------------------- reports


def _fit_status(rec: dict, limit_mb: float) -> None:
    """Set status/fit of a trial that ran to the end from its peak memory and the limit."""
    if rec["status"] not in ("ok", "did not fit"):
        return
    over = limit_mb > 0 and rec["peak_mb"] > limit_mb
    rec["status"], rec["fit"] = ("did not fit", "no") if over else ("ok", "yes")
    if over:
        rec["reason"] = f"peak {rec['peak_mb']:.0f} MiB > memory_limit_mb {limit_mb:.0f}"
    elif rec.get("reason", "").startswith("peak "):
        rec["reason"] = ""


def rank_rows(records: list[dict]) -> list[dict]:
    """Fitting trials by samples/s (fastest first), then did-not-fit, failed, rejected."""

    def key(r: dict) -> tuple:
        sps = r.get("samples_per_s")
        fast = -sps if isinstance(sps, (int, float)) and not math.isnan(sps) else 0.0
        return (STATUS_ORDER[r["status"]], fast, r["trial"])

    rows = sorted(records, key=key)
    return [{**r, "rank": i + 1} for i, r in enumerate(rows)]


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return "" if v is None else str(v)


def render_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def render_markdown(rows: list[dict], title: str) -> str:
    head = [
        "rank", "trial", "status", "fit", "ZeRO", "micro", "accum", "global", "bf16", "offload",
        "bucket", "overlap", "samples/s", "titles/s", "step s", "peak MiB/worker", "reason",
    ]  # fmt: skip
    out = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["rank"], f"{r['trial']:03d}", r["status"], r["fit"], r["zero_stage"],
            r["micro_batch"], r["grad_accum"], r["global_batch"], r["bf16"],
            r["offload_optimizer"], r["reduce_bucket_size"], r["overlap_comm"],
            _fmt(r.get("samples_per_s"), 1), _fmt(r.get("titles_per_s"), 1),
            _fmt(r.get("step_time_s"), 4), _fmt(r.get("peak_mb"), 0),
            str(r.get("reason") or "").replace("|", "\\|"),
        ]  # fmt: skip
        out.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


def best_command(
    config: str | None, overrides: list[str], ds_path: str, micro: int, ga: int
) -> tuple[str, list[str]]:
    """The launch/train.py line for the winner: the sweep's overrides with the winning knobs."""
    replaced = {"deepspeed", "trainer.micro_batch", "trainer.grad_accum"}
    kept = [o for o in overrides if parse_override(o)[0] not in replaced]
    ov = [*kept, f"deepspeed={ds_path}", f"trainer.micro_batch={micro}",
          f"trainer.grad_accum={ga}"]  # fmt: skip
    parts = ["python", "launch/train.py", *(["--config", str(config)] if config else []), *ov]
    return " ".join(shlex.quote(p) for p in parts), ov


def write_reports(
    out: Path, records: list[dict], space: Space, config: str | None, overrides: list[str]
) -> dict | None:
    """Rewrite results.csv/.md and the winner's files; return the winner's row (or None)."""
    for r in records:
        _fit_status(r, space.memory_limit_mb)
    rows = rank_rows(records)
    atomic_write_text(out / "results.csv", render_csv(rows))
    title = f"DeepSpeed sweep: {space.path} on {config or '<defaults>'}"
    atomic_write_text(out / "results.md", render_markdown(rows, title))
    best = next((r for r in rows if r["status"] == "ok"), None)
    if best is None:  # e.g. a lower memory_limit_mb on resume: no stale winner is left behind
        for name in ("best_deepspeed.json", "best_command.txt"):
            (out / name).unlink(missing_ok=True)
        return None
    ds = copy.deepcopy(best["deepspeed"])
    ds["_comment"] = (
        f"mtrec tune-deepspeed winner (trial {best['trial']:03d} of {space.path}): "
        f"{best['samples_per_s']:.1f} samples/s with {best['workers']} workers; pass "
        f"trainer.micro_batch={best['micro_batch']} trainer.grad_accum={best['grad_accum']}"
    )
    ds_path = out / "best_deepspeed.json"
    atomic_write_json(ds_path, ds)
    cmd, ov = best_command(config, overrides, str(ds_path), best["micro_batch"],
                           best["grad_accum"])  # fmt: skip
    atomic_write_text(out / "best_command.txt", cmd + "\n")
    return {**best, "command": cmd, "overrides": ov, "deepspeed_path": str(ds_path)}


# --------------------------------------------------------------------------- the sweep


def _fingerprint(base: Config, space: Space) -> str:
    """What the measurements depend on; a resume into an --out of another sweep is refused."""
    cfg = base.to_dict()
    cfg.pop("run_dir")
    blob = {
        "config": cfg,
        "deepspeed": load_ds_json(base.deepspeed),
        "dims": space.dims,
        "global_batch": space.global_batch,
        "warmup_steps": space.warmup_steps,
        "measure_steps": space.measure_steps,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _clock(s: float) -> str:
    m, sec = divmod(int(max(s, 0)), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}" if m >= 60 else f"{m:02d}:{sec:02d}"


def run_sweep(
    config: str | None,
    space_path: str | Path,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    retry_failed: bool = False,
) -> dict:
    """Run (or resume) a sweep; return ``{"out", "rows", "best", "ran", "skipped"}``.

    A rerun into the same ``out`` skips every finished trial; ``retry_failed`` runs the failed
    ones again (a worker lost to a flaky node is not a property of the configuration).

    ``best`` holds the winner's row plus ``command`` (the launch/train.py line), ``overrides``
    (what to pass to load_config) and ``deepspeed_path``; None when no trial fit.
    """
    overrides = list(overrides or [])
    base = load_config(config, overrides)
    space = load_space(space_path)
    out = Path(out or Path(base.run_dir) / "tune")
    manifest = load_manifest(base.prepared_dir)
    trials = plan_trials(base, space, manifest)
    fp = _fingerprint(base, space)

    state_path = out / STATE_FILE
    done = _finished_trials(state_path, fp, out)
    out.mkdir(parents=True, exist_ok=True)

    def record(tr: Trial, **kw: Any) -> dict:
        rec = {"trial": tr.index, "key": tr.key, "params": tr.params, **tr.columns(),
               "workers": tr.workers, "deepspeed": tr.ds, "status": "", "fit": "",
               "samples_per_s": None, "titles_per_s": None, "step_time_s": None,
               "peak_mb": None, "wall_s": None, "reason": "", "run_dir": ""}  # fmt: skip
        rec.update(kw)
        return rec

    def current() -> list[dict]:
        """This grid's finished trials (a resumed state may hold more, beyond max_trials)."""
        return [
            done.get(t.key) or record(t, status="rejected", reason=t.reject)
            for t in trials
            if t.key in done or t.reject
        ]

    def save() -> dict | None:
        state = {"fingerprint": fp, "space": space.path, "trials": list(done.values())}
        atomic_write_json(state_path, state)
        return write_reports(out, current(), space, config, overrides)

    def again(t: Trial) -> bool:
        return t.key not in done or (retry_failed and done[t.key]["status"] == "failed")

    todo = [t for t in trials if t.reject is None and again(t)]
    skipped = sum(1 for t in trials if t.key in done and not again(t))
    say(
        f"tune: {len(trials)} grid points from {space.path}: {len(todo)} to run, {skipped} done "
        f"before, {sum(1 for t in trials if t.reject)} rejected; out={out}"
    )
    best = save()
    t_start, ran = time.monotonic(), 0
    for tr in todo:
        rec = _run_trial(tr, base, manifest, space, out, record, run_training)
        done[tr.key] = rec
        ran += 1
        best = save()
        rec = done[tr.key]
        el = time.monotonic() - t_start
        eta = el / ran * (len(todo) - ran)
        what = _result_text(rec)
        say(
            f"tune: trial {tr.name} ({ran}/{len(todo)}) [{tr.describe()}] {rec['status']}: {what}"
            f"; elapsed {_clock(el)}, ETA {_clock(eta)}"
        )
    recs = current()
    for r in recs:
        _fit_status(r, space.memory_limit_mb)
    return {"out": str(out), "rows": rank_rows(recs), "best": best, "ran": ran, "skipped": skipped}


def _finished_trials(state_path: Path, fp: str, out: Path) -> dict[str, dict]:
    """Trials an earlier run of this very sweep finished, by key (none without a state file)."""
    if not state_path.is_file():
        return {}
    state = json.loads(state_path.read_text())
    if state.get("fingerprint") != fp:
        raise ConfigError(
            f"--out {out} holds a sweep of another config/space (fingerprint "
            f"{state.get('fingerprint')} != {fp}): use a new --out"
        )
    return {r["key"]: r for r in state["trials"]}


def _run_trial(
    tr: Trial, base: Config, manifest: dict, space, out: Path, record, run_training
) -> dict:
    """Run one trial in its own folder; its record, ``failed`` with a reason if it raised."""
    tdir = out / "trials" / tr.name
    if tdir.exists():  # a trial killed mid-run: start it afresh
        shutil.rmtree(tdir)
    tdir.mkdir(parents=True)
    atomic_write_json(tdir / "deepspeed.json", tr.ds)
    steps = space.warmup_steps + space.measure_steps
    t0 = time.monotonic()
    try:
        per_epoch = _per_epoch(manifest, tr, base)
        cfg = _trial_config(base, str(tdir / "deepspeed.json"), tr.micro_batch,
                            tr.grad_accum, steps, max(1, math.ceil(steps / per_epoch)),
                            str(tdir / "run"))  # fmt: skip
        run_training(cfg)
        m = summarize_log(tdir / "run" / "train_log.jsonl", space.warmup_steps,
                          space.measure_steps, tr.global_batch)  # fmt: skip
        rec = record(tr, status="ok", **m)
    except Exception as e:  # any failure of one trial is that trial's result
        reason = failure_reason(e)
        fit = "no" if _is_oom(reason) else ""
        try:  # died after its measured steps (final save/export, teardown): keep the numbers
            m = summarize_log(tdir / "run" / "train_log.jsonl", space.warmup_steps,
                              space.measure_steps, tr.global_batch)  # fmt: skip
            reason = f"after the measured steps: {reason}"
        except ValueError:
            m = {}
        rec = record(tr, status="failed", fit=fit, reason=reason, **m)
    rec["wall_s"] = round(time.monotonic() - t0, 3)
    rec["run_dir"] = str(tdir / "run")
    # Trials keep their log and config; the final checkpoint/export are only weight.
    for sub in ("ray", "checkpoints", "export"):
        shutil.rmtree(tdir / "run" / sub, ignore_errors=True)
    return rec


def _result_text(rec: dict) -> str:
    speed = (
        f"{rec['samples_per_s']:.1f} samples/s, {rec['titles_per_s']:.1f} titles/s, "
        f"{rec['step_time_s']:.3f} s/step, peak {rec['peak_mb']:.0f} MiB"
        if rec["samples_per_s"] is not None
        else ""
    )
    return "; ".join(x for x in (speed, rec["reason"]) if x)


def _per_epoch(manifest: dict, tr: Trial, base: Config) -> int:
    trial = replace(base.trainer, micro_batch=tr.micro_batch, grad_accum=tr.grad_accum)
    return max(1, StepPlan.of(manifest, tr.workers, trial).steps_per_epoch)
