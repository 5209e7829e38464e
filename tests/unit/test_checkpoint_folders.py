"""Checkpoint folders: complete means marked, the newest complete wins, retention sees all;
train_state.json errors name the file and key; ``--resume`` overrides safe or refused by name."""

import json

import pytest

from mtrec_dist.config import ConfigError, dump_config, load_config
from mtrec_dist.train.checkpoint import (
    COMPLETE,
    STATE_FILE,
    checkpoint_folder,
    newest_complete,
    prune,
    read_state,
    scan,
)


def _make(run, step, complete=True):
    d = checkpoint_folder(run, step)
    (d / "ds").mkdir(parents=True)
    if complete:
        (d / COMPLETE).write_text(json.dumps({"step": step}))
    return d


def test_newest_complete_ignores_and_names_incomplete(tmp_path):
    for s, ok in ((5, True), (10, True), (15, False)):
        _make(tmp_path, s, ok)
    said = []
    assert newest_complete(tmp_path, say=said.append) == checkpoint_folder(tmp_path, 10)
    assert said == [
        f"checkpoints: ignoring incomplete step_00000015 under {tmp_path / 'checkpoints'} "
        f"(no {COMPLETE} marker: the save was interrupted)"
    ]
    assert newest_complete(tmp_path / "none") is None


def test_retention_applies_to_every_folder_on_disk(tmp_path):
    for s, ok in ((3, False), (5, True), (10, True), (12, False), (15, True), (20, True)):
        _make(tmp_path, s, ok)
    gone = prune(tmp_path, keep=2)
    assert sorted(p.name for p in gone) == [
        "step_00000003", "step_00000005", "step_00000010", "step_00000012",
    ]  # fmt: skip
    complete, incomplete = scan(tmp_path)
    assert [p.name for p in complete] == ["step_00000015", "step_00000020"]
    assert incomplete == []


def _state(tmp_path, text):
    (tmp_path / STATE_FILE).write_text(text)
    return tmp_path / STATE_FILE


def test_invalid_train_state_names_file_line_and_keys(tmp_path):
    p = _state(tmp_path, '{"format": 1,\n "position": {"step": 3')
    with pytest.raises(ValueError) as e:
        read_state(tmp_path)
    assert str(e.value).startswith(f"{p}:2: not valid JSON")
    assert "keys format, position, world_size, zero_stage, config" in str(e.value)
    good = {"format": 1, "world_size": 1, "zero_stage": 1, "config": {}}
    _state(tmp_path, json.dumps({**good, "position": {"step": -1, "epoch": 0}}))
    with pytest.raises(ValueError) as e:
        read_state(tmp_path)
    assert str(e.value) == (
        f"{p}: key 'position' = {{'step': -1, 'epoch': 0}}; expected an object of non-negative "
        "integers with keys batches_done, epoch, samples, step"
    )
    _state(tmp_path, json.dumps({**good, "zero_stage": "2", "position": {
        "step": 1, "epoch": 0, "batches_done": 1, "samples": 8}}))  # fmt: skip
    with pytest.raises(ValueError, match=rf"{p}: key 'zero_stage' = '2'; expected an integer"):
        read_state(tmp_path)


@pytest.fixture
def run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None, ["model.encoder=tiny", "trainer.lr=0.001", f"run_dir={run}"])
    dump_config(cfg, run / "config.yaml")
    _make(run, 10)
    return run


def test_resume_applies_safe_overrides(run_folder):
    from mtrec_dist.train.launch import _resume_config

    cfg = _resume_config(str(run_folder), ["trainer.max_steps=40", "eval.max_impressions=5",
                                           "trainer.lr=0.001"])  # fmt: skip
    assert (cfg.trainer.max_steps, cfg.eval.max_impressions, cfg.trainer.lr) == (40, 5, 0.001)
    assert cfg.run_dir == str(run_folder)


def test_resume_refuses_each_unsafe_override_by_name(run_folder):
    from mtrec_dist.train.launch import _resume_config

    with pytest.raises(ConfigError) as e:
        _resume_config(
            str(run_folder), ["trainer.num_workers=1", "trainer.lr=0.5", "deepspeed=/x.json"]
        )
    msg = str(e.value)
    assert msg.startswith(
        f"--resume {run_folder}: cannot change trainer.lr (saved 0.001, asked 0.5); "
        "deepspeed (saved '', asked /x.json): the checkpoint belongs to the saved value"
    )
    assert "trainer.num_workers" not in msg.split(":")[1]  # 1 is the saved value: no change
    with pytest.raises(
        ConfigError, match=r"cannot change trainer.num_workers \(saved 1, asked 2\)"
    ):
        _resume_config(str(run_folder), ["trainer.num_workers=2"])


def test_a_new_run_adopts_only_checkpoints_its_launch_wrote(tmp_path):
    """Another run's checkpoint in the folder is never resumed by a new run (issue 24)."""
    mine, other = _make(tmp_path, 4), _make(tmp_path, 6)
    (mine / STATE_FILE).write_text(json.dumps({"run_id": "mine"}))
    (other / STATE_FILE).write_text(json.dumps({"run_id": "other"}))
    said = []
    assert newest_complete(tmp_path, say=said.append, run_id="mine") == mine
    assert said == [
        f"checkpoints: ignoring step_00000006 under {tmp_path / 'checkpoints'}: written by "
        "another run (this run is new)"
    ]
    assert newest_complete(tmp_path, say=said.append, run_id="new") is None
    assert newest_complete(tmp_path, say=said.append) == other  # --resume: the newest


def test_generator_states_round_trip_per_rank(tmp_path):
    """What a resumed step draws equals what the uninterrupted one drew: torch, numpy and
    Python's generators, one file per rank, loadable with weights_only=True."""
    import random

    import numpy as np
    import torch

    from mtrec_dist.train.checkpoint import restore_rng, rng_path, save_rng

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_rng(tmp_path, rank=1)
    want = (torch.rand(5), np.random.rand(5), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    assert restore_rng(tmp_path, rank=1)
    got = (torch.rand(5), np.random.rand(5), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2] == want[2]
    assert rng_path(tmp_path, 1).name == "rank_00001.pt"
    assert not restore_rng(tmp_path, rank=0)  # a checkpoint without them: nothing to set
    rng_path(tmp_path, 1).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=f"{rng_path(tmp_path, 1)}: not a readable generator"):
        restore_rng(tmp_path, rank=1)


def test_logs_cut_back_to_the_restored_step(tmp_path):
    """A resumed run continues at step s + 1: later records of the dead run go, torn lines
    too (train_log.jsonl used to read 1,2,3,4,3,4,5...)."""
    from mtrec_dist.train.logging import truncate_log

    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"step": s, "loss/main": s / 10}) for s in (1, 2, 3, 4)]
    log.write_text("\n".join(lines) + '\n{"step": 5, "lo')
    truncate_log(log, 2)
    assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"
    truncate_log(tmp_path / "missing.jsonl", 2)
    assert not (tmp_path / "missing.jsonl").exists()
