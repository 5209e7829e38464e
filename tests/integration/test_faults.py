"""Faults and resume of `mtrec train` as a person runs it (issue 24, docs/design.md §6).

Every run here is the CLI in its own process with its own local Ray (as the audit ran it),
one worker, the tiny config with its default dropout (0.1: a resume is exact only if the
checkpoint holds the generators dropout draws from). The oracle is one uninterrupted run:

- a driver SIGKILLed after the step-10 checkpoint takes its whole Ray session with it (every
  process it had started is gone, found by id; survivors are killed by id and fail the test);
- ``--resume`` then continues from the newest complete checkpoint, names the incomplete
  folder it ignores on the console and in console.log, and ends with the uninterrupted run's
  per-step losses and weights, each step logged once;
- ``--resume`` of a finished run trains no step past max_steps;
- a second writer is refused before any worker starts, naming the holder; the lock of a dead
  holder is no obstacle;
- an error only a worker can find (a truncated checkpoint file) reaches the console as one
  line naming the file and the full log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
STEPS = 40
KILL_AT = 10  # the driver dies once this checkpoint is complete
ARGS = [
    f"trainer.max_steps={STEPS}",
    "trainer.checkpoint_every=5",
    "trainer.keep_checkpoints=2",
    "trainer.log_every=5",
    "trainer.timeout_s=60",
]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)  # no leftover Ray token files
    env.pop("MTREC_QUIET", None)  # the console is part of what is tested
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _cmd(tiny_data: Path, run_dir: Path, *extra: str, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "mtrec_dist.cli", "train"]
    if resume:
        return [*cmd, "--resume", str(run_dir), *extra]
    cfg = [f"data.root={tiny_data}", f"run_dir={run_dir}", *ARGS, *extra]
    return [*cmd, "--config", str(REPO / "configs" / "tiny.yaml"), *cfg]


def _run(cmd: list[str], home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=home, env=_env(home), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[tuple[int, dict]]:
    return [(r["step"], {k: v for k, v in r.items() if k.startswith("loss/")})
            for r in _records(run_dir)]  # fmt: skip


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "model.safetensors"))


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _session_of(driver: int) -> dict[int, int]:
    """pid -> start time of every process descending from ``driver`` (its local Ray)."""
    from mtrec_dist.train.runlock import _proc_table, descendants

    return descendants(driver, _proc_table())


def _still_running(procs: dict[int, int]) -> dict[int, int]:
    return {p: s for p, s in procs.items() if _start_time(p) == s}


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("straight")
    p = _run(_cmd(tiny_data, home / "run"), home)
    assert p.returncode == 0, p.stderr[-3000:]
    return home / "run"


@pytest.fixture(scope="module")
def killed(tiny_data, tmp_path_factory) -> dict:
    """A run whose driver is SIGKILLed once checkpoint KILL_AT is complete: the session's
    processes at that moment, those still running 30 s later (then killed here, by id)."""
    from mtrec_dist.train.checkpoint import COMPLETE, checkpoint_folder, scan

    home = tmp_path_factory.mktemp("killed")
    run_dir = home / "run"
    marker = checkpoint_folder(run_dir, KILL_AT) / COMPLETE
    driver = subprocess.Popen(_cmd(tiny_data, run_dir), cwd=home, env=_env(home),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(driver.stdout.read()), daemon=True)
    reader.start()
    session: dict[int, int] = {}
    end = time.monotonic() + 240
    scanned = 0.0
    while not marker.is_file() and driver.poll() is None and time.monotonic() < end:
        if time.monotonic() - scanned > 0.5:
            session.update(_session_of(driver.pid))
            scanned = time.monotonic()
        time.sleep(0.005)
    session.update(_session_of(driver.pid))
    newest = scan(run_dir)[0]
    os.kill(driver.pid, signal.SIGKILL)  # the driver only
    driver.wait(timeout=30)
    deadline = time.monotonic() + 30
    left = _still_running(session)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _still_running(session)
    survivors = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left}
    for pid in left:  # what the driver left behind is ended here, by id
        os.kill(pid, signal.SIGKILL)
    reader.join(timeout=10)
    return {
        "run_dir": run_dir,
        "home": home,
        "session": session,
        "survivors": survivors,
        "newest": int(newest[-1].name.split("_")[1]) if newest else 0,
        "steps_after": [r["step"] for r in _records(run_dir)],
        "output": b"".join(out).decode(errors="replace"),
    }


def test_killed_driver_takes_its_ray_session_with_it(killed):
    assert killed["newest"] >= KILL_AT, killed["output"][-3000:]  # killed mid-run, not after
    assert killed["steps_after"][-1] < STEPS
    assert len(killed["session"]) >= 4  # gcs, raylet, agents, the worker: Ray was running
    assert killed["survivors"] == {}


def test_resume_after_a_killed_session_equals_the_uninterrupted_run(straight, killed):
    from mtrec_dist.train.checkpoint import checkpoint_folder, scan

    run_dir = killed["run_dir"]
    assert KILL_AT <= killed["newest"] < STEPS  # the kill interrupted the run
    # a save interrupted midway (the kill may have left one): ignored, and said so where a
    # person looks
    complete, half = scan(run_dir)
    if not half:
        half = [checkpoint_folder(run_dir, int(complete[-1].name[5:]) + 5)]
        (half[0] / "ds").mkdir(parents=True)
    p = _run(_cmd(None, run_dir, resume=True), killed["home"])
    assert p.returncode == 0, p.stderr[-3000:]
    names = ", ".join(h.name for h in half)
    note = f"checkpoints: ignoring incomplete {names} under {run_dir / 'checkpoints'}"
    assert note in p.stdout + p.stderr
    assert note in (run_dir / "console.log").read_text()
    # each step logged once, with the uninterrupted run's losses (dropout on: the generators
    # came back with the checkpoint), and the same final weights, bit for bit
    got, want = _losses(run_dir), _losses(straight)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert got == want
    a, b = _weights(straight), _weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # TensorBoard: the dead run's steps past the checkpoint are purged, each step shown once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    tb = [(e.step, e.value) for e in ea.Scalars("loss/main")]
    assert tb == [(s, pytest.approx(r["loss/main"])) for s, r in want]


def test_resuming_a_finished_run_trains_no_further_step(straight, tmp_path):
    from mtrec_dist.train.checkpoint import scan

    before = (straight / "train_log.jsonl").read_text()
    weights = _weights(straight)
    p = _run(_cmd(None, straight, resume=True), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"train: {STEPS}/{STEPS} steps" in p.stderr
    assert [c.name for c in scan(straight)[0]] == [f"step_{STEPS - 5:08d}", f"step_{STEPS:08d}"]
    assert (straight / "train_log.jsonl").read_text() == before
    after = _weights(straight)
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def test_second_writer_refused_before_any_worker_starts(tiny_data, tmp_path):
    """A live holder of the run folder: refused at once, naming its pid and host. Once that
    holder is dead (SIGKILL: no clean-up ran), its lock is no obstacle."""
    import socket

    from mtrec_dist.train.runlock import LOCK_FILE, RunFolderBusy, run_lock

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mtrec_dist.train.runlock import run_lock\n"
         f"with run_lock({str(run_dir)!r}):\n    print('held', flush=True)\n    time.sleep(300)"],
        env=_env(tmp_path), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        p = _run(_cmd(tiny_data, run_dir), tmp_path)
        assert p.returncode == 2
        assert p.stderr.splitlines() == [
            f"mtrec train: error: run_dir={run_dir} is in use by pid {holder.pid} on host "
            f"{socket.gethostname()} (since "
            + json.loads((run_dir / LOCK_FILE).read_text())["started"]
            + f"; lock {run_dir / LOCK_FILE}): a second run would mix its checkpoints, logs "
            "and export with that run's. Wait for it to end or stop it, or set run_dir to "
            "another folder"
        ]
        assert "ray logs:" not in p.stdout + p.stderr  # no Ray, no worker was started
        assert sorted(x.name for x in run_dir.iterdir()) == [LOCK_FILE]
        with pytest.raises(RunFolderBusy):
            with run_lock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with run_lock(run_dir):  # the dead holder's lock file is still there, and taken over
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_worker_error_reaches_the_console_as_one_line(straight, tmp_path):
    """A truncated optimizer partition is found only by the worker that loads it."""
    run_dir = tmp_path / "copy"
    shutil.copytree(straight, run_dir, ignore=shutil.ignore_patterns("ray"))
    # the copy's lock file names the straight run's driver, long gone: not in the way
    bad = next((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "ds").glob("*optim_states.pt"))
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    p = _run(_cmd(None, run_dir, f"trainer.max_steps={STEPS + 5}", resume=True), tmp_path)
    assert p.returncode == 2
    log = run_dir / "logs" / "train_error.log"
    last = p.stderr.splitlines()[-1]
    assert last.startswith(f"mtrec train: error: training failed on rank 0: ValueError: {bad}: "
                           "not a readable torch checkpoint file")  # fmt: skip
    assert last.endswith(f"(full log: {log})")
    assert "Traceback" not in p.stdout + p.stderr
    assert "Traceback" in log.read_text() and str(bad) in log.read_text()
