"""Checkpoint files are read without running code from them, and damaged ones are named.

One in-process DeepSpeed engine (gloo, one rank, ZeRO-1) started through ``engine.initialize``
with a stale ``lock`` planted in the shared torch-extensions cache (which must not be waited
on), saves a checkpoint, then loads it back after each kind of damage.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch

pytestmark = pytest.mark.timeout(300)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from mtrec_dist.train import ds_engine as E

    tmp_path = tmp_path_factory.mktemp("ext")
    monkeypatch = pytest.MonkeyPatch()
    shared = tmp_path / "shared_cache"
    (shared / E.SHM_OP).mkdir(parents=True)
    (shared / E.SHM_OP / "lock").write_text("")  # a build killed midway, long ago
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(shared))
    monkeypatch.setenv("MTREC_TORCH_EXTENSIONS_DIR", str(tmp_path / "ours"))
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    for k, v in {**env, "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    torch.distributed.init_process_group(
        "gloo", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ds = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    eng, _, _ = E.initialize(model, opt, sched, ds, deadline_s=5)
    eng.backward(eng(torch.randn(2, 4)).sum())
    eng.step()
    yield eng
    monkeypatch.undo()


def test_engine_started_past_a_stale_shared_lock_and_round_trips(engine, tmp_path):
    from mtrec_dist.train import ds_engine as E

    assert os.environ["TORCH_EXTENSIONS_DIR"].endswith("ours")
    want = {k: v.clone() for k, v in engine.module.state_dict().items()}
    E.save_engine(engine, tmp_path / "ck", "ds")
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    E.load_engine(engine, tmp_path / "ck", "ds")
    got = engine.module.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_pickled_callable_is_refused_and_named(engine, tmp_path):
    from mtrec_dist.train import ds_engine as E

    E.save_engine(engine, tmp_path / "ck", "ds")
    target = tmp_path / "ck" / "ds" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "pwned"
    torch.save({"module": _Exploit(str(marker))}, target)
    with pytest.raises(ValueError) as e:
        E.load_engine(engine, tmp_path / "ck", "ds")
    assert str(e.value).startswith(f"{target}: refused to load: it holds 'posix.system'")
    assert not marker.exists()


def test_a_truncated_optimizer_file_names_the_file(engine, tmp_path):
    from mtrec_dist.train import ds_engine as E

    E.save_engine(engine, tmp_path / "ck", "ds")
    target = tmp_path / "ck" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        E.load_engine(engine, tmp_path / "ck", "ds")
    msg = str(e.value)
    assert msg.startswith(f"{target}: not a readable torch checkpoint file")
    assert "expected a complete file written by engine.save_checkpoint" in msg


def test_a_stale_lock_in_our_extensions_folder_fails_within_the_deadline(tmp_path):
    from mtrec_dist.train.ds_engine import wait_for_build_locks

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    now = [100.0]  # a simulated clock: each sleep advances it by exactly the poll interval
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    with pytest.raises(TimeoutError) as e:
        wait_for_build_locks(
            tmp_path, deadline_s=1.0, poll_s=0.25, clock=lambda: now[0], sleep=sleep
        )
    assert sleeps == [0.25] * 4 and now[0] == 101.0  # gave up at the deadline, not later
    assert str(e.value).startswith(
        f"worker start-up waited 1 s on the torch-extension build lock(s) {lock}: a build killed"
    )
    lock.unlink()
    wait_for_build_locks(tmp_path, deadline_s=1.0)  # nothing left to wait on: returns


def test_a_write_that_fails_midway_keeps_the_previous_checkpoint(engine, tmp_path):
    """A checkpoint write hitting EFBIG (RLIMIT_FSIZE, as a full disk would) raises naming the
    folder and the newest complete checkpoint, which stays the one resumed; resuming from it
    continues exactly (the next step equals the one taken without the failed save)."""
    import resource

    from mtrec_dist.config import load_config
    from mtrec_dist.train.checkpoint import (
        Position,
        checkpoint_folder,
        newest_complete,
        restore,
        save,
        scan,
    )

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))

    def one_step() -> dict[str, torch.Tensor]:
        engine.backward(engine(x).sum())
        engine.step()
        return {k: v.clone() for k, v in engine.module.state_dict().items()}

    save(engine, cfg, Position(step=2), rank=0)
    want = one_step()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, hard))  # Python ignores SIGXFSZ: EFBIG
    try:
        with pytest.raises(OSError) as e:
            save(engine, cfg, Position(step=4), rank=0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    two, four = checkpoint_folder(tmp_path, 2), checkpoint_folder(tmp_path, 4)
    assert str(e.value).startswith(
        f"checkpoint {four}: writing rank 0's files failed (OSError: {four}/ds/mp_rank_00_model_"
        "states.pt: write failed (RuntimeError: "
    )
    assert f"the newest complete checkpoint is still {two} " in str(e.value)
    assert scan(tmp_path) == ([two], [four]) and newest_complete(tmp_path) == two
    pos = restore(engine, newest_complete(tmp_path))
    assert pos == Position(step=2)
    got = one_step()
    assert all(torch.equal(got[k], want[k]) for k in want)
