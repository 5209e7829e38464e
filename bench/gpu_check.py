"""One prepared GPU check (issue 25): every figure the GPU path needs, in one call of <= 8 minutes.

    timeout 480 python bench/gpu_check.py [--out bench/results/gpu_check.json] [--budget 450]
    python bench/gpu_check.py --smoke --out /tmp/gpu_check.json     # CPU, tiny, the test suite

``--budget`` (default 450 s; 900 with ``--smoke``) bounds the whole run: a section starts only
while time is left and never runs past the smaller of its own budget and what is left, so the
call ends within 8 minutes (``timeout 480`` is the backstop; the JSON on disk then holds every
section finished before it).

Nothing is downloaded: the encoder is written into a temporary folder from
``transformers.BertConfig()`` defaults (BERT-base: 12 layers, hidden 768, 12 heads, FFN 3072)
with random weights and the shipped MiniLM tokenizer (same WordPiece vocabulary, so the
prepared data's tokenizer check passes); ``--smoke`` writes a 2-layer hidden-32 encoder
(``hub.TINY``) the same way. The data is synthetic MIND (``small``; ``tiny`` with ``--smoke``)
generated and prepared into the same folder with ``data.title_len=30``; batches come from the
real training stream at history 50 (``bench/_common.py``), so history lengths, repeats and
de-duplication are the data's. ``--smoke`` keeps bf16 for the engine steps (DeepSpeed 0.19.8
runs it on CPU, as tests/integration/test_deepspeed_configs.py shows), uses gloo instead of NCCL,
one timed step per part and the evaluator's fp32 path only.

Sections, each fault-isolated (an error is recorded in its JSON entry and the script goes on),
each with a time budget (a hard SIGALRM limit; loops also stop early when their share is spent),
each announced on stderr; the JSON is rewritten atomically after every section:

* ``environment``: torch, CUDA, NCCL, DeepSpeed, Ray, transformers versions; GPU name, memory
  and its bf16 dense peak (``PEAK_BF16_TFLOPS``, matched by device name; null on CPU).
* ``steps``: the MTRec step (2 gradient groups, surgery ``mtrec``) and the BERT-baseline step
  (1 group) as the trainer runs them (``build_optimizer`` + ``ds_engine.initialize`` +
  ``MultiTaskGradients``), bf16 under ZeRO-2 (``configs/deepspeed/zero2_bf16.json``), micro
  batch 32 and 64 (8 and 16 with ``--smoke``). Batches are moved to the device before the
  clock starts. The first pass over the distinct batches is the warm-up and is run under
  ``torch.utils.flop_counter.FlopCounterMode`` (counted FLOPs of forward + every backward +
  surgery per batch); timed steps cycle the same batches, so
  ``tflops = sum(counted FLOPs of the timed steps) / timed wall seconds / 1e12`` and
  ``fraction_of_peak = tflops / peak``. ``peak_mem_mb`` = ``torch.cuda.max_memory_allocated``
  (null on CPU). ``mtrec_over_bert`` = MTRec step seconds / BERT step seconds over the same
  batches; ``surgery_share`` = (``mtg.step`` minus ``engine.step``, both synchronised) /
  step seconds; ``surgery_share_counter`` = MultiTaskGradients' own counter (on CUDA it reads
  the clock before the combination's kernels finish). ``encoder_forward_flops``: the encoder's
  forward on one batch's titles, counted, beside the analytic count
  N (8 U L H^2 + 4 U L^2 H + 4 U L H I).
* ``zero2_vs_zero3``: MTRec at the first micro batch under ZeRO-2 and ZeRO-3 bf16, peak memory.
* ``ray_train``: ``mtrec train`` as a subprocess (the CLI), Ray Train with one worker
  (``trainer.use_gpu`` and NCCL on CUDA, gloo on CPU), ZeRO-2 bf16, 20 steps (2 with
  ``--smoke``); ``startup_s`` (launch to the start of the first step) apart from the steps;
  samples/s and the memory from the run's ``train_log.jsonl``.
* ``evaluator``: ``mtrec_dist.eval.evaluate.evaluate`` on a run folder exported with the config
  overrides ``eval.device=cuda`` (and a second time ``eval.bf16=true``), over the dev split's
  first shard: titles encoded per second (``news_encoded`` / encode seconds) and impressions
  scored per second (impressions / score seconds), from the evaluator's own record.
* ``fp32_cuda_vs_cpu``: one fp32 MTRec training step (``train.local.reference_step``: forward,
  per-group gradients, surgery, AdamW) from the same weights on the same batch, on CUDA (TF32
  off) and on CPU. Relative differences: losses ``|a-b|/|b|``, the combined gradient and the
  parameters after the step ``||a-b||_2 / ||b||_2`` over all parameters; pass when each is
  <= 1e-5 (the worst single tensor is reported too). On CPU (``--smoke``) both sides are CPU.
* ``projection``: hours per MIND-large training epoch = samples / samples_per_s / 3600, with
  samples = 2,232,748 (MIND-large's training impressions, ``SCALES["large"].train``) and, since
  a training sample is one click (docs/design.md §2.4), also with impressions x the clicks per
  impression of the generated data; from the MTRec step at the largest micro batch measured
  and from the Ray run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import Stopwatch, batch_shape, free_port, loader_batches  # noqa: E402
from bench_eval import first_shards  # noqa: E402
from bench_surgery import CONFIGS  # noqa: E402

from mtrec_dist import hub  # noqa: E402
from mtrec_dist.config import Config, dump_config, load_config  # noqa: E402
from mtrec_dist.data.prepare import prepare  # noqa: E402
from mtrec_dist.data.prepared import load_manifest  # noqa: E402
from mtrec_dist.data.synthetic import SCALES, generate  # noqa: E402
from mtrec_dist.eval.evaluate import evaluate  # noqa: E402
from mtrec_dist.models.outputs import group_losses  # noqa: E402
from mtrec_dist.models.registry import build_model, resolve_groups  # noqa: E402
from mtrec_dist.train import ds_engine  # noqa: E402
from mtrec_dist.train.dsconfig import resolve_deepspeed  # noqa: E402
from mtrec_dist.train.export import export_run  # noqa: E402
from mtrec_dist.train.local import reference_step  # noqa: E402
from mtrec_dist.train.optim import build_optimizer, build_scheduler  # noqa: E402
from mtrec_dist.utils import atomic_write_json, peak_rss_mb  # noqa: E402

MIND_LARGE_TRAIN_IMPRESSIONS = SCALES["large"].train  # 2,232,748
TOLERANCE = 1e-5  # fp32 CUDA vs CPU, relative
HISTORY, TITLE_LEN = 50, 30
ZERO2 = ROOT / "configs" / "deepspeed" / "zero2_bf16.json"
ZERO3 = ROOT / "configs" / "deepspeed" / "zero3_bf16.json"
# bf16 dense (no sparsity) tensor-core peaks from the vendor data sheets, TFLOP/s. Matched in
# order: the first entry all of whose words appear in the device name (case-insensitive) and
# none of whose excluded words do.
PEAK_BF16_TFLOPS: list[tuple[str, tuple[str, ...], tuple[str, ...], float]] = [
    ("H200", ("h200",), (), 989.4),
    ("H100 PCIe", ("h100", "pcie"), (), 756.0),
    ("H100 NVL", ("h100", "nvl"), (), 835.5),
    ("H100 SXM", ("h100",), ("pcie", "nvl"), 989.4),
    ("A100", ("a100",), (), 312.0),
]
SECTIONS = (
    "environment",
    "steps",
    "zero2_vs_zero3",
    "ray_train",
    "evaluator",
    "fp32_cuda_vs_cpu",
    "projection",
)


def say(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pure arithmetic


def match_peak(device_name: str | None) -> dict | None:
    """The bf16 dense peak of the GPU named ``device_name`` (``torch.cuda.get_device_name``),
    or None for a device not in the table (or no GPU)."""
    if not device_name:
        return None
    name = device_name.lower()
    for label, words, excluded, tflops in PEAK_BF16_TFLOPS:
        if all(w in name for w in words) and not any(x in name for x in excluded):
            return {"device": label, "bf16_dense_tflops": tflops}
    return None


def achieved(flops: float, seconds: float, peak_tflops: float | None) -> dict:
    """TFLOP/s of ``flops`` counted FLOPs done in ``seconds``, and its fraction of the peak."""
    tflops = flops / seconds / 1e12
    return {"tflops": tflops, "fraction_of_peak": tflops / peak_tflops if peak_tflops else None}


def epoch_hours(samples: float, samples_per_s: float) -> float:
    """Hours one epoch of ``samples`` takes at ``samples_per_s``."""
    return samples / samples_per_s / 3600.0


def bert_forward_flops(titles: int, length: int, hidden: int, layers: int, inter: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of a BERT encoder's forward over ``titles`` x
    ``length`` tokens: per layer Q, K, V and output projections (8 U L H^2), attention scores
    and their product with V (4 U L^2 H), the feed-forward pair (4 U L H I)."""
    u, n, h = titles, length, hidden
    return layers * (8 * u * n * h * h + 4 * u * n * n * h + 4 * u * n * h * inter)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||_2 / ||b||_2`` in float64 (0 when both are zero, inf when only ``b`` is)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    num, den = float(torch.linalg.vector_norm(a - b)), float(torch.linalg.vector_norm(b))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def table_rows(res: dict) -> list[tuple[str, str, str]]:
    """(section, figure, value) rows of the printed table, read from the result JSON."""
    rows: list[tuple[str, str, str]] = []
    secs = res.get("sections", {})
    for name in SECTIONS:
        s = secs.get(name)
        if s is None:
            continue
        if not s.get("ok"):
            rows.append((name, "FAILED", s.get("error", "?")[:100]))
            continue
        if name == "environment":
            for k in ("torch", "cuda", "nccl", "deepspeed", "gpu", "gpu_memory_gb"):
                rows.append((name, k, _fmt(s.get(k))))
            peak = s.get("peak")
            rows.append((name, "bf16 dense peak TFLOP/s", _fmt(peak and peak["bf16_dense_tflops"])))
        elif name == "steps":
            for key, r in s.get("runs", {}).items():
                rows.append(
                    (
                        name,
                        key,
                        f"{_fmt(r['samples_per_s'])} samples/s, {_fmt(r['titles_per_s'])} "
                        f"titles/s, {_fmt(r['tflops'])} TFLOP/s "
                        f"({_fmt(r['fraction_of_peak'])} of peak), "
                        f"peak mem {_fmt(r['peak_mem_mb'])} MB",
                    )
                )
            for key, r in s.get("ratios", {}).items():
                rows.append(
                    (
                        name,
                        f"micro {key}",
                        f"MTRec/BERT step {_fmt(r['mtrec_over_bert'])}, surgery share "
                        f"{_fmt(r['surgery_share'])}",
                    )
                )
        elif name == "zero2_vs_zero3":
            for k in ("zero2_peak_mem_mb", "zero3_peak_mem_mb", "zero3_over_zero2"):
                rows.append((name, k, _fmt(s.get(k))))
        elif name == "ray_train":
            for k in ("steps", "startup_s", "steps_s", "samples_per_s", "peak_mem_mb"):
                rows.append((name, k, _fmt(s.get(k))))
        elif name == "evaluator":
            for key, r in s.get("runs", {}).items():
                rows.append(
                    (
                        name,
                        key,
                        f"{_fmt(r['titles_per_s'])} titles/s, {_fmt(r['impressions_per_s'])} "
                        f"impressions/s (device {_fmt(r.get('device_reported'))})",
                    )
                )
        elif name == "fp32_cuda_vs_cpu":
            rows.append((name, "max relative difference", _fmt(s.get("max_rel_diff"))))
            rows.append((name, f"pass (<= {TOLERANCE:g})", _fmt(s.get("pass"))))
        elif name == "projection":
            for key, p in s.get("from", {}).items():
                rows.append(
                    (
                        name,
                        key,
                        f"{_fmt(p['hours_per_epoch'])} h/epoch (impressions), "
                        f"{_fmt(p['hours_per_epoch_clicks'])} h/epoch (clicks)",
                    )
                )
    return rows


def format_table(res: dict) -> str:
    """The printed table: one aligned line per row of :func:`table_rows`."""
    rows = table_rows(res)
    if not rows:
        return ""
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


# --------------------------------------------------------------------------- sections: harness


class SectionTimeout(Exception):
    """A section ran past its time budget."""


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCounterMode]:
    """``FlopCounterMode`` with attention on SDPA's math backend: the fused CPU attention kernel
    has no FLOP formula in torch's counter (it would count 0), the math backend's matmuls are
    counted on every device. Only counted (untimed) passes run under it."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        yield fc


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in this (main) thread after ``seconds``."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum, frame):
        raise SectionTimeout(f"over its time budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Check:
    """Shared state of one check: mode, device, budgets, the temporary data and encoder."""

    def __init__(self, a: argparse.Namespace, work: Path):
        self.a, self.work = a, work
        self.smoke: bool = a.smoke
        self.cuda = torch.cuda.is_available() and not a.smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.t0 = time.monotonic()
        self.micro = (8, 16) if self.smoke else (32, 64)
        self.prepared = work / "prepared"
        self.encoder = work / "encoder"
        self.encoder_config: dict = {}
        self.clicks_per_impression: float | None = None
        self._batches: dict[int, list] = {}
        self._ds_ready = False
        self.res: dict = {
            "benchmark": "gpu_check",
            "mode": "smoke" if self.smoke else "full",
            "device": self.device.type,
            "budget_s": a.budget,
            "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]),
            "started_unix": time.time(),
            "sections": {},
        }

    # -- harness
    def left(self) -> float:
        return self.a.budget - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.res["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        Path(self.a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.a.out, self.res)

    def section(
        self, name: str, budget_s: float, fn: Callable[[dict, float], None], always: bool = False
    ) -> dict:
        """Run ``fn(out, deadline)``; ``out`` (filled as it goes) is kept whatever happens.
        ``always``: run within its own budget even when the overall one is spent (arithmetic
        on what the sections before measured)."""
        budget = budget_s if always else min(budget_s, max(self.left(), 0.0))
        out: dict = {}
        t0 = time.monotonic()
        say(f"{name}: start (budget {budget:.0f} s, {self.left():.0f} s left overall)")
        try:
            if not always and self.left() <= 1.0:
                raise SectionTimeout("no time left in the overall budget")
            with time_limit(budget):
                fn(out, t0 + 0.8 * budget)
            rec = {"ok": True, **out}
        except Exception as e:  # fault isolation: record and go on
            rec = {
                **out,
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-3000:],
            }
        rec["seconds"] = round(time.monotonic() - t0, 2)
        rec["budget_s"] = round(budget, 1)
        self.res["sections"][name] = rec
        self.save()
        say(f"{name}: {'ok' if rec['ok'] else 'FAILED: ' + rec['error']} in {rec['seconds']} s")
        return rec

    # -- shared inputs
    def overrides(self, **extra: str) -> list[str]:
        base = {
            "data.root": str(self.work / "raw"),
            "data.prepared": str(self.prepared),
            "data.title_len": str(TITLE_LEN),
            "data.history_len": str(HISTORY),
            "data.loader_workers": "0",
            "model.encoder": str(self.encoder),
            "trainer.checkpoint_every": "0",
            "trainer.seed": "0",
        }
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]

    def config(self, **extra: str) -> Config:
        return load_config(None, self.overrides(**extra))

    def batches(self, micro: int) -> list:
        """The training stream's first distinct batches of ``micro`` samples (cached)."""
        if micro not in self._batches:
            n = 1 if self.smoke else 3
            self._batches[micro] = loader_batches(
                self.prepared, batch_size=micro, n=n, history_len=HISTORY
            )
        return self._batches[micro]

    def ds_init(self) -> None:
        """This process as a one-rank DeepSpeed world (NCCL on CUDA, gloo on CPU)."""
        if self._ds_ready:
            return
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
        )
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.cuda else "cpu")
        import deepspeed  # lazy: seconds to import; only the engine sections need it

        ds_engine._no_shm_build()  # no JIT build of an op training never calls
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", verbose=False)
        self._ds_ready = True

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# --------------------------------------------------------------------------- setup


def setup(ck: Check, out: dict, deadline: float) -> None:
    """Synthetic MIND (small / tiny) prepared at title_len 30; the random encoder folder."""
    from transformers import BertConfig, BertModel  # lazy: HF offline flags are set by hub

    bert_cfg = BertConfig(vocab_size=30522, **hub.TINY) if ck.smoke else BertConfig()
    torch.manual_seed(0)
    with hub.quiet_transformers():  # no progress bar for writing one local shard
        BertModel(bert_cfg, add_pooling_layer=False).save_pretrained(str(ck.encoder))
    src = hub.minilm_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / f).is_file():
            shutil.copy(src / f, ck.encoder / f)
    scale = "tiny" if ck.smoke else "small"
    generate(ck.work / "raw", scale=scale, seed=0, progress=False)
    per_shard = 100 if ck.smoke else 1000
    prepare(ck.config(**{"data.impressions_per_shard": str(per_shard)}), progress=False)
    manifest = load_manifest(ck.prepared)
    train = manifest["splits"]["train"]
    ck.clicks_per_impression = int(train["clicks"]) / int(train["impressions"])
    ck.encoder_config = {
        "hidden": bert_cfg.hidden_size,
        "layers": bert_cfg.num_hidden_layers,
        "heads": bert_cfg.num_attention_heads,
        "intermediate": bert_cfg.intermediate_size,
        "vocab": bert_cfg.vocab_size,
    }
    out.update(
        scale=scale,
        title_len=TITLE_LEN,
        history_len=HISTORY,
        train_impressions=int(train["impressions"]),
        train_clicks=int(train["clicks"]),
        clicks_per_impression=ck.clicks_per_impression,
        news=int(manifest["news"]["count"]),
        encoder="BertConfig() defaults, random weights" if not ck.smoke else "hub.TINY, random",
        encoder_config=ck.encoder_config,
    )


# --------------------------------------------------------------------------- sections


def environment(ck: Check, out: dict, deadline: float) -> None:
    import deepspeed  # lazy: see Check.ds_init
    import ray  # lazy: seconds to import
    import transformers  # lazy: see hub

    out.update(
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        nccl=None,
        deepspeed=deepspeed.__version__,
        ray=ray.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        cpus=os.cpu_count(),
        gpu=None,
        gpu_memory_gb=None,
        peak=None,
    )
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version()
        out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_gb"] = round(props.total_memory / 2**30, 2)
        out["gpu_count"] = torch.cuda.device_count()
        out["peak"] = match_peak(out["gpu"])


def _timed_engine_step(ck: Check, engine, acc: list[float]) -> None:
    """Wrap ``engine.step`` so its synchronised seconds are appended to ``acc``."""
    inner = engine.step

    def step(*args, **kwargs):
        ck.sync()
        t0 = time.perf_counter()
        r = inner(*args, **kwargs)
        ck.sync()
        acc.append(time.perf_counter() - t0)
        return r

    engine.step = step


def engine_run(
    ck: Check,
    config: str,
    micro: int,
    ds_json: Path,
    deadline: float,
    count_flops: bool = True,
    timed_steps: int = 10,
) -> dict:
    """One fresh engine built as the trainer builds it; see the module docstring (steps)."""

    ck.ds_init()
    name, groups, mode = CONFIGS[config]
    cfg = ck.config(
        **{
            "model.name": name,
            "trainer.micro_batch": str(micro),
            "trainer.surgery": mode,
            "deepspeed": str(ds_json),
        }
    )
    cfg.model.groups = groups
    torch.manual_seed(0)
    model = build_model(cfg, load_manifest(ck.prepared))
    groups = resolve_groups(cfg, model)
    ds = resolve_deepspeed(cfg, world_size=1)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, 1000, cfg.trainer.warmup_ratio)
    if ck.cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine, optimizer, scheduler = ds_engine.initialize(model, optimizer, scheduler, ds, 120.0)
    mtg = ds_engine.MultiTaskGradients(
        engine, model, list(groups), mode, cfg.trainer.surgery_scope,
        model.shared_parameter_names(), 0,
    )  # fmt: skip
    engine_s: list[float] = []
    _timed_engine_step(ck, engine, engine_s)
    batches = [b.to(engine.device) for b in ck.batches(micro)]
    step_no = [0]

    def one(b) -> tuple[dict, float]:
        mtg.backward(group_losses(engine(b).losses, groups))
        ck.sync()
        t0 = time.perf_counter()
        st = mtg.step(step_no[0])
        ck.sync()
        step_no[0] += 1
        return st, time.perf_counter() - t0

    try:
        flops: list[int] = []
        for b in batches:  # the warm-up pass, FLOPs counted (not timed)
            if count_flops:
                with counting_flops() as fc:
                    one(b)
                flops.append(int(fc.get_total_flops()))
            else:
                one(b)
        one(batches[0])  # one more warm-up step, on the attention kernels the timing uses
        sw = Stopwatch(sync=ck.sync)
        timed_flops = samples = titles = 0
        surgery_s = counter_s = 0.0
        engine_s.clear()
        for i in range(timed_steps):
            if i and time.monotonic() > deadline:
                break
            b = batches[i % len(batches)]
            with sw:
                st, mtg_step_s = one(b)
            surgery_s += mtg_step_s - engine_s[-1]
            counter_s += st.get("surgery/time_s", 0.0)
            timed_flops += flops[i % len(flops)] if flops else 0
            samples += int(b.sample_mask.sum())
            titles += int(b.num_titles)
        summ = sw.summary()
        wall = summ["wall_s_total"]
        peak = ck.res["sections"].get("environment", {}).get("peak") or {}
        res = {
            "model": name,
            "groups": list(groups),
            "surgery": mode,
            "micro_batch": micro,
            "precision": "bf16" if ds.get("bf16", {}).get("enabled") else "fp32",
            "zero_stage": int(ds["zero_optimization"]["stage"]),
            "timed_steps": summ["blocks"],
            "wall_s_total": wall,
            "wall_s_median": summ["wall_s_median"],
            "samples": samples,
            "titles": titles,
            "samples_per_s": samples / wall,
            "titles_per_s": titles / wall,
            "flops_per_batch": flops,
            "counted_flops": timed_flops if count_flops else None,
            "tflops": None,
            "fraction_of_peak": None,
            "surgery_s_total": surgery_s,
            "surgery_share": surgery_s / wall,
            "surgery_share_counter": counter_s / wall,
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if ck.cuda else None,
            "peak_rss_mb": peak_rss_mb(),
        }
        if count_flops:
            res.update(
                achieved(timed_flops, wall, peak.get("bf16_dense_tflops") if ck.cuda else None)
            )
        return res
    finally:
        engine.destroy()
        batches.clear()  # the engine and model go with this frame
        gc.collect()
        if ck.cuda:
            torch.cuda.empty_cache()


def encoder_forward_flops(ck: Check) -> dict:
    """Counted FLOPs of the encoder's forward on the first batch's titles, and the formula's."""

    b = ck.batches(ck.micro[0])[0]
    bert = hub.load_encoder(str(ck.encoder)).to(ck.device).eval()
    with torch.no_grad(), counting_flops() as fc:
        bert(input_ids=b.tokens.to(ck.device), attention_mask=b.attention_mask.to(ck.device))
    e = ck.encoder_config
    u, n = int(b.tokens.shape[0]), int(b.tokens.shape[1])
    return {
        "titles": u,
        "length": n,
        **e,
        "counted": int(fc.get_total_flops()),
        "analytic": bert_forward_flops(u, n, e["hidden"], e["layers"], e["intermediate"]),
    }


def steps(ck: Check, out: dict, deadline: float) -> None:
    out["encoder_forward_flops"] = encoder_forward_flops(ck)
    out["batches"] = {str(m): batch_shape(ck.batches(m)) for m in ck.micro}
    runs: dict = out.setdefault("runs", {})
    jobs = [(c, m) for m in ck.micro for c in ("bert", "mtrec")]
    for k, (config, micro) in enumerate(jobs):
        share = (deadline - time.monotonic()) / (len(jobs) - k)
        say(f"steps: {config} micro {micro} (ZeRO-2 bf16)")
        runs[f"{config}_micro{micro}"] = engine_run(
            ck, config, micro, ZERO2, time.monotonic() + share, timed_steps=1 if ck.smoke else 10
        )
        ck.save()
    out["ratios"] = {}
    for m in ck.micro:
        b, t = runs[f"bert_micro{m}"], runs[f"mtrec_micro{m}"]
        # same batches, same cycle: per-step seconds compare (the counts of steps may differ)
        out["ratios"][str(m)] = {
            "mtrec_over_bert": (t["wall_s_total"] / t["timed_steps"])
            / (b["wall_s_total"] / b["timed_steps"]),
            "surgery_share": t["surgery_share"],
            "surgery_share_counter": t["surgery_share_counter"],
        }


def zero2_vs_zero3(ck: Check, out: dict, deadline: float) -> None:
    micro = ck.micro[0]
    out["micro_batch"] = micro
    half = (deadline - time.monotonic()) / 2
    for key, path in (("zero2", ZERO2), ("zero3", ZERO3)):
        say(f"zero2_vs_zero3: {key} micro {micro}")
        r = engine_run(
            ck, "mtrec", micro, path, time.monotonic() + half, count_flops=False, timed_steps=2
        )
        out[key] = {k: r[k] for k in ("zero_stage", "precision", "timed_steps", "samples_per_s")}
        out[f"{key}_peak_mem_mb"] = r["peak_mem_mb"]
        out[f"{key}_peak_rss_mb"] = r["peak_rss_mb"]
        half = deadline - time.monotonic()
    z2, z3 = out["zero2_peak_mem_mb"], out["zero3_peak_mem_mb"]
    out["zero3_over_zero2"] = z3 / z2 if z2 and z3 is not None else None


RAY_ENV_DROP = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "DS_ACCELERATOR")


@contextlib.contextmanager
def _without_env(names: tuple[str, ...]) -> Iterator[None]:
    """The block runs with ``names`` removed from the environment (restored after)."""
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def ray_train(ck: Check, out: dict, deadline: float) -> None:
    """``mtrec train`` through the CLI in a subprocess (its own process group, killed on
    timeout with every Ray process it started)."""
    n_steps = 2 if ck.smoke else 20
    micro = ck.micro[0]
    run_dir = ck.work / "ray_run"
    ov = ck.overrides(
        **{
            "run_dir": str(run_dir),
            "deepspeed": str(ZERO2),
            "trainer.num_workers": "1",
            "trainer.use_gpu": "true" if ck.cuda else "false",
            "trainer.cpus_per_worker": "1" if ck.smoke else str(max(1, (os.cpu_count() or 2) // 2)),
            "trainer.micro_batch": str(micro),
            "trainer.max_steps": str(n_steps),
            "trainer.epochs": "10",
            "trainer.log_every": "1",
            "trainer.timeout_s": "120" if ck.smoke else "300",
            "data.loader_workers": "0" if ck.smoke else "2",
        }
    )
    cmd = [sys.executable, "-m", "mtrec_dist.cli", "train", *ov]
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV_DROP}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log_path = ck.work / "ray_train.log"
    out.update(command="mtrec train " + " ".join(ov), micro_batch=micro, steps_asked=n_steps)
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
            start_new_session=True,
        )  # fmt: skip
        try:
            last = time.monotonic()
            while proc.poll() is None:
                time.sleep(1.0)
                if time.monotonic() - last > 15:
                    last = time.monotonic()
                    logged = run_dir / "train_log.jsonl"
                    n = len(logged.read_text().splitlines()) if logged.is_file() else 0
                    say(f"ray_train: {time.time() - t0:.0f} s, {n} steps logged")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # our child's own session only
                proc.wait()
    wall = time.time() - t0
    out["exit_code"] = proc.returncode
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"mtrec train exited {proc.returncode}: " + " | ".join(tail))
    recs = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines() if x]
    step_s = [micro / r["throughput/samples_per_s"] for r in recs]
    first_start = recs[0]["time/unix"] - step_s[0]
    tail = recs[2:] or recs[-1:]
    mem = [r.get("mem/gpu_peak_mb", r.get("mem/peak_mb")) for r in recs]
    out.update(
        steps=len(recs),
        run_wall_s=wall,
        startup_s=first_start - t0,
        steps_s=t0 + wall - first_start,
        samples_per_s=statistics.median(r["throughput/samples_per_s"] for r in tail),
        titles_per_s=statistics.median(r["throughput/titles_per_s"] for r in tail),
        step_wall_s_median=statistics.median(step_s[2:] or step_s[-1:]),
        peak_mem_mb=max(m for m in mem if m is not None)
        if any(m is not None for m in mem)
        else None,
        peak_mem_key="mem/gpu_peak_mb" if "mem/gpu_peak_mb" in recs[0] else "mem/peak_mb",
        backend="nccl" if ck.cuda else "gloo",
    )
    if len(recs) != n_steps:
        raise RuntimeError(f"{len(recs)} steps logged, {n_steps} asked")


def evaluator(ck: Check, out: dict, deadline: float) -> None:
    """The evaluator's public entry point on an exported run whose config asks for the GPU."""

    prepared = ck.work / "eval_prepared"
    if not prepared.exists():
        prepared = first_shards(ck.prepared, "dev", 1, ck.work)
        prepared = prepared.rename(ck.work / "eval_prepared")
    device = "cuda" if ck.cuda else "cpu"
    extra = {
        "data.prepared": str(prepared),
        "run_dir": str(ck.work / "eval_run"),
        "eval.num_workers": "1",
        "eval.encode_batch": "1024" if ck.cuda else "256",
    }
    cfg = ck.config(**extra, **{"eval.device": device, "eval.bf16": "false"})
    out["overrides"] = [f"eval.device={device}"]
    manifest = load_manifest(prepared)
    torch.manual_seed(0)
    export_run(build_model(cfg, manifest).eval(), cfg, manifest, step=0)
    run = Path(cfg.run_dir)
    runs: dict = out.setdefault("runs", {})
    variants = [("fp32", [])] + ([("bf16", ["eval.bf16=true"])] if ck.cuda else [])
    for key, ov in variants:
        if ov:
            dump_config(load_config(run / "config.yaml", ov), run / "config.yaml")
        shutil.rmtree(run / "eval", ignore_errors=True)  # no vector cache from the other run
        say(f"evaluator: {key} on {device}")
        with _without_env(RAY_ENV_DROP):  # evaluator workers are not ranks of this process
            r = evaluate(run, "dev", num_workers=1)
        sec = r["seconds"]
        runs[key] = {
            "impressions": int(r["impressions"]),
            "news_encoded": int(r["news_encoded"]),
            "encode_s": sec["encode"],
            "score_s": sec["score"],
            "titles_per_s": r["news_encoded"] / max(sec["encode"], 1e-9),
            "impressions_per_s": r["impressions"] / max(sec["score"], 1e-9),
            "auc": r["auc"],
            "device_asked": device,
            "device_reported": r["device"],  # what the evaluator says it used
        }
        ck.save()
    if "bf16" in runs:
        out["bf16_auc_minus_fp32"] = runs["bf16"]["auc"] - runs["fp32"]["auc"]


def fp32_cuda_vs_cpu(ck: Check, out: dict, deadline: float) -> None:

    micro = 4 if ck.smoke else 8
    cfg = ck.config(**{"model.dropout": "0.0", "trainer.micro_batch": str(micro)})
    manifest = load_manifest(ck.prepared)
    batch = loader_batches(ck.prepared, batch_size=micro, n=1, history_len=HISTORY)[0]
    other = torch.device("cuda") if torch.cuda.is_available() and not ck.smoke else None

    def one(device: torch.device) -> dict:
        torch.manual_seed(0)
        model = build_model(cfg, manifest).to(device).train()
        groups = resolve_groups(cfg, model)
        opt = build_optimizer(model, cfg.trainer)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads: dict[str, torch.Tensor] = {}
        inner = opt.step

        def step(*args, **kwargs):  # the combined gradient, as the optimizer reads it
            for n, p in named:
                if p.grad is not None:
                    grads[n] = p.grad.detach().cpu().clone()
            return inner(*args, **kwargs)

        opt.step = step
        init = {n: p.detach().cpu().clone() for n, p in named}
        st = reference_step(
            model, [batch.to(device)], groups, cfg.trainer.surgery, cfg.trainer.surgery_scope,
            opt, seed=0, step=0,
        )  # fmt: skip
        params = {n: p.detach().cpu().clone() for n, p in named}
        return {"losses": st["losses"], "grads": grads, "params": params, "init": init}

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        say(f"fp32_cuda_vs_cpu: {other or 'cpu (no CUDA)'} side")
        a = one(other or torch.device("cpu"))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    say("fp32_cuda_vs_cpu: cpu side")
    b = one(torch.device("cpu"))
    names = sorted(b["params"])
    loss_rel = max(abs(a["losses"][k] - v) / max(abs(v), 1e-30) for k, v in b["losses"].items())
    gnames = sorted(set(a["grads"]) & set(b["grads"]))
    cat = lambda d, ks: torch.cat([d[k].reshape(-1).double() for k in ks])  # noqa: E731
    grad_rel = rel_diff(cat(a["grads"], gnames), cat(b["grads"], gnames))
    param_rel = rel_diff(cat(a["params"], names), cat(b["params"], names))
    upd = {n: (a["params"][n] - a["init"][n], b["params"][n] - b["init"][n]) for n in names}
    update_rel = rel_diff(
        torch.cat([x.reshape(-1) for x, _ in upd.values()]),
        torch.cat([y.reshape(-1) for _, y in upd.values()]),
    )
    worst = max(((rel_diff(a["grads"][n], b["grads"][n]), n) for n in gnames), default=(0.0, ""))
    out.update(
        compared=f"{other or 'cpu'} vs cpu",
        micro_batch=micro,
        losses=b["losses"],
        loss_rel_diff=loss_rel,
        grad_rel_diff=grad_rel,
        param_rel_diff=param_rel,
        update_rel_diff=update_rel,
        worst_tensor_grad_rel_diff={"tensor": worst[1], "rel_diff": worst[0]},
        grad_sets_equal=set(a["grads"]) == set(b["grads"]),
        tolerance=TOLERANCE,
    )
    out["max_rel_diff"] = max(loss_rel, grad_rel, param_rel)
    out["pass"] = bool(out["max_rel_diff"] <= TOLERANCE and out["grad_sets_equal"])


def projection(ck: Check, out: dict, deadline: float) -> None:
    secs = ck.res["sections"]
    sources: dict[str, float] = {}
    runs = secs.get("steps", {}).get("runs", {})
    for m in sorted(ck.micro, reverse=True):
        r = runs.get(f"mtrec_micro{m}")
        if r:
            sources[f"steps_mtrec_micro{m}"] = r["samples_per_s"]
            break
    if secs.get("ray_train", {}).get("ok"):
        sources["ray_train"] = secs["ray_train"]["samples_per_s"]
    if not sources:
        raise RuntimeError("no samples/s measured (steps and ray_train both failed)")
    cpi = ck.clicks_per_impression
    out.update(
        impressions=MIND_LARGE_TRAIN_IMPRESSIONS,
        clicks_per_impression=cpi,
        clicks=MIND_LARGE_TRAIN_IMPRESSIONS * cpi if cpi else None,
        goal_hours=1.0,
        note="training samples are clicks (docs/design.md §2.4); clicks = MIND-large's "
        "training impressions x the clicks per impression of the generated synthetic data",
    )
    out["from"] = {
        k: {
            "samples_per_s": v,
            "hours_per_epoch": epoch_hours(MIND_LARGE_TRAIN_IMPRESSIONS, v),
            "hours_per_epoch_clicks": epoch_hours(out["clicks"], v) if cpi else None,
        }
        for k, v in sources.items()
    }


BUDGETS = {  # seconds per section (full, smoke); the whole run stops at --budget
    "setup": (45, 120),
    "environment": (20, 60),
    "steps": (120, 200),
    "zero2_vs_zero3": (45, 120),
    "ray_train": (120, 240),
    "evaluator": (60, 120),
    "fp32_cuda_vs_cpu": (60, 120),
    "projection": (5, 10),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny encoder, one step per part")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds; 0 = 450 (900 smoke)")
    ap.add_argument("--work", help="folder for the temporary data (default: system temp)")
    a = ap.parse_args(argv)
    a.budget = a.budget or (900.0 if a.smoke else 450.0)
    os.environ.setdefault("MTREC_QUIET", "1")
    if a.smoke:  # DeepSpeed picks its accelerator once, at first use: CPU even on a GPU node
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed renames
    if a.smoke:
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="gpu_check_", dir=a.work) as tmp:
        ck = Check(a, Path(tmp))
        pick = 1 if a.smoke else 0
        setup_rec = ck.section("setup", BUDGETS["setup"][pick], lambda o, d: setup(ck, o, d))
        ck.res["setup"] = ck.res["sections"].pop("setup")
        fns = {
            "environment": environment,
            "steps": steps,
            "zero2_vs_zero3": zero2_vs_zero3,
            "ray_train": ray_train,
            "evaluator": evaluator,
            "fp32_cuda_vs_cpu": fp32_cuda_vs_cpu,
            "projection": projection,
        }
        for name in SECTIONS:
            if not setup_rec["ok"] and name != "environment":
                ck.res["sections"][name] = {"ok": False, "error": "setup failed"}
                continue
            fn = fns[name]
            ck.section(
                name, BUDGETS[name][pick], lambda o, d, f=fn: f(ck, o, d), name == "projection"
            )
        ck.save()
    table = format_table(ck.res)
    print(table)
    say(f"wrote {a.out} in {ck.res['elapsed_s']:.0f} s")
    return ck.res


if __name__ == "__main__":
    main()
