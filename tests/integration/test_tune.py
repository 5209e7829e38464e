"""`mtrec tune-deepspeed`: a real tiny sweep (Ray Train + DeepSpeed, 1 CPU worker) and its parts.

One sweep of 7 grid points (offload_optimizer [none,cpu] x zero_stage [1,2,3] x micro_batch
[4,3] under global_batch 8, cut to 7 by max_trials) is the fixture: 3 trials train, 1 fails at
run time (optimizer offload: the fused surgery's ValueError), 3 are rejected before start
(8 is not divisible by micro 3). The numbers in its table are checked against each trial's own
train_log.jsonl, the winner's JSON and printed command train, and a rerun resumes without
running anything.
"""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]

SPACE = """\
offload_optimizer: [none, cpu]
zero_stage: [1, 2, 3]
micro_batch: [4, 3]
global_batch: 8
warmup_steps: 1
measure_steps: 2
max_trials: 7
"""
# grid order (first dimension slowest): index -> expected status
EXPECTED = {
    0: "ok",  # ZeRO-1 micro 4 (x2 accumulation)
    1: "rejected",  # micro 3 does not divide 8
    2: "ok",  # ZeRO-2 micro 4
    3: "rejected",
    4: "ok",  # ZeRO-3 micro 4
    5: "rejected",
    6: "failed",  # ZeRO-1 + optimizer offload: the surgery refuses it inside the worker
}


def _overrides(tiny_data: Path, run_dir: Path) -> list[str]:
    return [f"data.root={tiny_data}", f"run_dir={run_dir}", "trainer.timeout_s=60"]


@pytest.fixture(scope="module")
def sweep(ray_session, tiny_data, tmp_path_factory):
    from mtrec_dist.train.tune import run_sweep

    d = tmp_path_factory.mktemp("tune")
    space = d / "space.yaml"
    space.write_text(SPACE)
    cfg = str(REPO / "configs" / "tiny.yaml")
    out = d / "out"
    res = run_sweep(cfg, space, _overrides(tiny_data, d / "run"), out=out)
    return {"res": res, "out": out, "space": space, "cfg": cfg, "dir": d}


def _csv(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _measured(log: Path, warmup: int, measure: int, gb: int) -> dict:
    """Independent oracle: the means over steps warmup+1..warmup+measure of the train log."""
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    by_step = {r["step"]: r for r in recs}
    sel = [by_step[s] for s in range(warmup + 1, warmup + measure + 1)]
    sps = [r["throughput/samples_per_s"] for r in sel]
    return {
        "samples_per_s": sum(sps) / measure,
        "titles_per_s": sum(r["throughput/titles_per_s"] for r in sel) / measure,
        "step_time_s": sum(gb / x for x in sps) / measure,
        "peak_mb": max(r["mem/peak_mb"] for r in recs),
    }


def test_sweep_table_ranked_and_measured(sweep):
    out = sweep["out"]
    rows = _csv(out)
    assert sorted(int(r["trial"]) for r in rows) == list(range(7))
    assert {int(r["trial"]): r["status"] for r in rows} == EXPECTED
    assert [int(r["rank"]) for r in rows] == list(range(1, 8))
    # the order: fitting trials by samples/s descending, then failed, then rejected
    ok = [r for r in rows if r["status"] == "ok"]
    assert rows[:3] == ok
    assert [float(r["samples_per_s"]) for r in ok] == sorted(
        (float(r["samples_per_s"]) for r in ok), reverse=True
    )
    assert [int(r["trial"]) for r in rows[3:]] == [6, 1, 3, 5]
    for r in ok:
        assert r["fit"] == "yes" and r["micro_batch"] == "4" and r["grad_accum"] == "2"
        assert r["zero_stage"] == str({0: 1, 2: 2, 4: 3}[int(r["trial"])])
        log = out / "trials" / f"{int(r['trial']):03d}" / "run" / "train_log.jsonl"
        assert Path(r["run_dir"]) == log.parent
        want = _measured(log, warmup=1, measure=2, gb=8)
        for k, v in want.items():
            assert float(r[k]) == pytest.approx(v, rel=1e-12), k
        # 3 steps of 8 samples each were run (warm-up + measured), nothing more
        assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
    # only started trials have run folders; checkpoints/exports of trials are removed
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["000", "002", "004", "006"]
    assert not list((out / "trials").glob("*/run/ray"))
    # the Markdown has one row per trial, in the CSV's order
    md = (out / "results.md").read_text().splitlines()
    body = [ln for ln in md if ln.startswith("| ") and not ln.startswith("| rank")]
    assert [int(ln.split("|")[2]) for ln in body] == [int(r["trial"]) for r in rows]
    assert "None" not in "\n".join(md) and all(ln.count("|") == 18 for ln in body)
    # what run_sweep returns is the same table
    assert [r["trial"] for r in sweep["res"]["rows"]] == [int(r["trial"]) for r in rows]
    assert sweep["res"]["ran"] == 4 and sweep["res"]["skipped"] == 0


def test_failures_are_recorded_and_the_sweep_goes_on(sweep):
    rows = {int(r["trial"]): r for r in _csv(sweep["out"])}
    # the failure came out of run_training (Ray wraps the worker's exception); the sweep
    # caught it, recorded it and still wrote the table and the winner
    assert sweep["res"]["best"] is not None and (sweep["out"] / "best_deepspeed.json").is_file()
    failed = rows[6]
    assert failed["offload_optimizer"] == "cpu" and failed["fit"] == ""
    assert failed["reason"] == (
        "ValueError: DeepSpeed config: zero_optimization.offload_optimizer is not supported "
        "by the fused surgery trainer.surgery=mtrec (gradients must stay in device memory); "
        "use trainer.surgery=none with offload, or a config without offload"
    )
    assert failed["samples_per_s"] == "" and failed["peak_mb"] == ""
    assert (sweep["out"] / "trials" / "006" / "deepspeed.json").is_file()
    for i in (1, 3, 5):  # never started
        assert rows[i]["reason"] == (
            "global_batch 8 is not divisible by micro_batch 3 x 1 workers = 3"
        )
        assert rows[i]["grad_accum"] == "" and rows[i]["global_batch"] == "8"
        assert not (sweep["out"] / "trials" / f"{i:03d}").exists()


def test_winner_json_and_command_train(sweep, tmp_path):
    from mtrec_dist.config import load_config
    from mtrec_dist.train.launch import run_training

    out = sweep["out"]
    best_row = _csv(out)[0]
    ds = json.loads((out / "best_deepspeed.json").read_text())
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
              "gradient_accumulation_steps", "gradient_clipping"):  # fmt: skip
        assert ds[k] == "auto", k
    assert ds["zero_optimization"]["stage"] == int(best_row["zero_stage"])
    assert "offload_optimizer" not in ds["zero_optimization"]

    cmd = (out / "best_command.txt").read_text().strip()
    tok = shlex.split(cmd)
    assert tok[:4] == ["python", "launch/train.py", "--config", sweep["cfg"]]
    assert tok[-3:] == [
        f"deepspeed={out / 'best_deepspeed.json'}",
        "trainer.micro_batch=4",
        "trainer.grad_accum=2",
    ]
    assert sweep["res"]["best"]["command"] == cmd
    cfg = load_config(tok[3], [*tok[4:], f"run_dir={tmp_path / 'best'}", "trainer.max_steps=2"])
    run_training(cfg)
    log = tmp_path / "best" / "train_log.jsonl"
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    # 8 samples per step = 4 micro x 2 accumulation x 1 worker, as the command says
    assert cfg.trainer.micro_batch * cfg.trainer.grad_accum * cfg.trainer.num_workers == 8


def test_rerun_resumes_and_reclassifies_memory(sweep, tiny_data):
    from mtrec_dist.train.tune import run_sweep

    out = sweep["out"]
    before = {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("*")}
    rows0 = _csv(out)
    res = run_sweep(sweep["cfg"], sweep["space"], _overrides(tiny_data, sweep["dir"] / "run"),
                    out=out)  # fmt: skip
    assert res["ran"] == 0 and res["skipped"] == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("*")} == before
    assert _csv(out) == rows0

    # same grid with a memory limit (memory_limit_mb is not part of what a resume must match):
    # nothing runs, the recorded peaks are judged again
    peaks = {int(r["trial"]): float(r["peak_mb"]) for r in rows0 if r["status"] == "ok"}
    sps = {int(r["trial"]): float(r["samples_per_s"]) for r in rows0 if r["status"] == "ok"}
    space2 = sweep["dir"] / "space_limit.yaml"
    for limit in (min(peaks.values()) - 1.0, min(peaks.values())):
        space2.write_text(SPACE + f"memory_limit_mb: {limit!r}\n")
        res = run_sweep(sweep["cfg"], space2, _overrides(tiny_data, sweep["dir"] / "run"), out=out)
        assert res["ran"] == 0
        rows = _csv(out)
        fit = {i for i, p in peaks.items() if p <= limit}
        no_fit = set(peaks) - fit
        by_trial = {int(r["trial"]): r for r in rows}
        for i in peaks:
            assert by_trial[i]["status"] == ("ok" if i in fit else "did not fit")
            assert by_trial[i]["fit"] == ("yes" if i in fit else "no")
        # fitting trials first (fastest first), then the ones that did not fit (fastest first)
        order = sorted(fit, key=lambda i: -sps[i]) + sorted(no_fit, key=lambda i: -sps[i])
        assert [int(r["trial"]) for r in rows[: len(peaks)]] == order
        if fit:
            assert res["best"]["trial"] == order[0]
            assert (out / "best_deepspeed.json").is_file()
        else:  # no winner: no stale best files either
            assert res["best"] is None and not (out / "best_deepspeed.json").exists()
            assert by_trial[order[0]]["reason"].startswith("peak ")
    # --retry-failed runs the failed trial again (and only it), in a fresh folder
    others = {p: t for p, t in before.items() if "006" not in p.relative_to(out).parts}
    res = run_sweep(sweep["cfg"], space2, _overrides(tiny_data, sweep["dir"] / "run"), out=out,
                    retry_failed=True)  # fmt: skip
    assert res["ran"] == 1 and res["skipped"] == 3
    now = {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("*")}
    assert {p: t for p, t in now.items() if "006" not in p.relative_to(out).parts} == others
    log6 = out / "trials" / "006" / "run" / "train_log.jsonl"
    assert (out / "trials" / "006" / "deepspeed.json") in now and not log6.exists()
    assert {int(r["trial"]): r["status"] for r in _csv(out)}[6] == "failed"
    # a different grid into the same folder is refused
    from mtrec_dist.config import ConfigError

    space3 = sweep["dir"] / "space_other.yaml"
    space3.write_text(SPACE.replace("measure_steps: 2", "measure_steps: 3"))
    with pytest.raises(ConfigError, match="use a new --out"):
        run_sweep(sweep["cfg"], space3, _overrides(tiny_data, sweep["dir"] / "run"), out=out)


# --------------------------------------------------------------------------- no Ray below


def test_space_errors_name_file_line_and_key(tmp_path, capsys):
    from mtrec_dist.config import ConfigError
    from mtrec_dist.train.tune import load_space

    p = tmp_path / "s.yaml"
    p.write_text("zero_stage: [1, 2]\nmicro_bach: [4]\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: unknown key 'micro_bach'"):
        load_space(p)
    # the command line reports it as a usage error (exit 2), before anything starts
    from mtrec_dist.cli import main

    assert main(["tune-deepspeed", "--config", str(REPO / "configs/tiny.yaml"),
                 "--space", str(p)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"mtrec tune-deepspeed: error: {p}:2: unknown key 'micro_bach'" in err
    p.write_text("zero_stage: [1, 4]\n")
    with pytest.raises(ConfigError, match=rf"{p}:1: zero_stage: expected 0, 1, 2 or 3, got 4"):
        load_space(p)
    p.write_text("offload_optimizer: [nvme]\n")
    with pytest.raises(ConfigError, match=r"offload_optimizer: expected one of none, cpu"):
        load_space(p)
    p.write_text("micro_batch: []\n")
    with pytest.raises(ConfigError, match="micro_batch: empty list"):
        load_space(p)


def test_shipped_spaces_parse_to_the_expected_grids():
    from mtrec_dist.train.tune import load_space

    s = load_space(REPO / "configs" / "tune" / "space.yaml")
    assert len(s.grid()) == 3 * 3 * 1 * 2 * 2
    assert s.dims["reduce_bucket_size"] == [50_000_000, 200_000_000]  # 5e7 read as an int
    t = load_space(REPO / "configs" / "tune" / "tiny_space.yaml")
    assert len(t.grid()) == 8 and t.global_batch == 8
    # deterministic order: the first dimension varies slowest
    assert [tuple(g.values()) for g in t.grid()[:3]] == [(1, 4, False), (1, 4, True), (1, 8, False)]


def test_plan_rejects_bad_batch_arithmetic_and_bad_json(tiny_cfg, tmp_path):
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.train.tune import load_space, plan_trials

    p = tmp_path / "s.yaml"
    p.write_text("micro_batch: [4, 8]\ngrad_accum: [1, 2]\nglobal_batch: 16\n")
    cfg = tiny_cfg("trainer.num_workers=2")
    trials = plan_trials(cfg, load_space(p), load_manifest(cfg.prepared_dir))
    # 4x1x2=8, 4x2x2=16, 8x1x2=16, 8x2x2=32
    assert [t.reject for t in trials] == [
        "micro_batch 4 x grad_accum 1 x 2 workers = 8 != global_batch 16",
        None,
        None,
        "micro_batch 8 x grad_accum 2 x 2 workers = 32 != global_batch 16",
    ]
    assert trials[1].resolved["train_batch_size"] == 16
    assert trials[1].resolved["gradient_accumulation_steps"] == 2
    # more micro-batches per step than a worker's share of the clicks gives: no step at all
    p.write_text("micro_batch: [100]\ngrad_accum: [1000]\n")
    (t,) = plan_trials(cfg, load_space(p), load_manifest(cfg.prepared_dir))
    assert "no optimizer step per epoch" in t.reject
    # resolve_deepspeed's own errors (here a misspelt ZeRO key in the base JSON) reject too
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_com": True}}))
    p.write_text("zero_stage: [1, 2]\n")
    cfg = tiny_cfg(f"deepspeed={bad}")
    trials = plan_trials(cfg, load_space(p), load_manifest(cfg.prepared_dir))
    assert all(t.reject.startswith("trial JSON: zero_optimization:") for t in trials)
    assert all("overlap_com" in t.reject for t in trials)


def test_summarize_log_and_failure_reason(tmp_path):
    from mtrec_dist.train.tune import failure_reason, summarize_log

    log = tmp_path / "train_log.jsonl"
    recs = [
        (1, 10.0, 100.0, 500.0),  # warm-up: ignored for throughput, counted for the peak
        (2, 20.0, 150.0, 400.0),
        (3, 40.0, 250.0, 450.0),
    ]
    log.write_text("".join(
        json.dumps({"step": s, "throughput/samples_per_s": a, "throughput/titles_per_s": b,
                    "mem/peak_mb": m}) + "\n"
        for s, a, b, m in recs
    ))  # fmt: skip
    m = summarize_log(log, warmup=1, measure=2, global_batch=8)
    assert m == {
        "samples_per_s": 30.0,
        "titles_per_s": 200.0,
        "step_time_s": (8 / 20 + 8 / 40) / 2,
        "peak_mb": 500.0,
    }
    with pytest.raises(ValueError, match=r"steps \[4\] were not logged"):
        summarize_log(log, warmup=1, measure=3, global_batch=8)

    text = (
        "Training failed:\nTraceback (most recent call last):\n  File x\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    )
    assert failure_reason(RuntimeError(text)) == (
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )

    class Wrapped(Exception):
        worker_failures = {1: KeyError("rank 1"), 0: ValueError("bad\nsecond line")}

    assert failure_reason(Wrapped("outer")) == "ValueError: bad"
