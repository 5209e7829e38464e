"""Atomic writes and the progress line."""

import os
import stat
import subprocess
import sys

import pytest

from mtrec_dist.utils import (
    Progress,
    _fmt_rate,
    atomic_open,
    atomic_swap_dir,
    atomic_write_json,
    say,
)


def test_atomic_open_replaces_only_on_success(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    with atomic_open(p, "w") as f:
        f.write("one\n")
    assert p.read_text() == "one\n"
    with pytest.raises(RuntimeError), atomic_open(p, "w") as f:
        f.write("two, half written")
        raise RuntimeError("crash mid-write")
    assert p.read_text() == "one\n"  # the old file survives
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.txt"]  # no temp file left


def test_atomic_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        import importlib

        import mtrec_dist.utils as u

        importlib.reload(u)  # the module reads the umask once
        u.atomic_write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    finally:
        os.umask(old)
        importlib.reload(u)
    atomic_write_json(tmp_path / "b.json", [1])
    assert (tmp_path / "b.json").read_text() == "[\n  1\n]\n"


def test_atomic_open_rejects_read_modes(tmp_path):
    with (
        pytest.raises(ValueError, match="mode must be 'w' or 'wb'"),
        atomic_open(tmp_path / "x", "r"),
    ):
        pass


def test_rate_and_eta_formatting(capsys, monkeypatch):
    assert _fmt_rate(0.4, "steps") == "2.5 s/step"
    assert _fmt_rate(1234.4, "impressions") == "1,234 impressions/s"
    monkeypatch.delenv("MTREC_QUIET", raising=False)
    bar = Progress("train", total=10, unit="steps", every=0.0)
    clock = iter([0.0, 4.0, 4.0])
    monkeypatch.setattr("mtrec_dist.utils.time.monotonic", lambda: next(clock))
    bar.t0 = bar.last = 0.0
    bar.update(2)  # 2 steps in 4 s -> 0.5 steps/s, 8 left -> 16 s
    err = capsys.readouterr().err
    want = "train: 2/10 steps (20.0%) 2.0 s/step, elapsed 00:04, ETA 00:16"  # clock mocked
    assert err.strip() == want


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


def _new_folder(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def test_atomic_swap_dir_puts_the_new_folder_in_place(tmp_path):
    final = tmp_path / "export"
    atomic_swap_dir(_new_folder(tmp_path / ".t1", {"a.txt": "one", "d/b.txt": "two"}), final)
    assert _tree(final) == {"a.txt": "one", "d/b.txt": "two"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    # a second swap replaces the old content as a whole: no file of the old folder survives
    atomic_swap_dir(_new_folder(tmp_path / ".t2", {"c.txt": "three"}), final)
    assert _tree(final) == {"c.txt": "three"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no side folder left


def test_atomic_swap_dir_failing_midway_keeps_the_old_folder(tmp_path, monkeypatch):
    final = _new_folder(tmp_path / "prepared", {"manifest.json": "old"})
    tmp = _new_folder(tmp_path / ".tmp", {"manifest.json": "new"})
    real = os.replace
    calls = []

    def second_fails(src, dst):  # the old folder moved aside, then the new one cannot move in
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr("mtrec_dist.utils.os.replace", second_fails)
    with pytest.raises(OSError, match="disk gone"):
        atomic_swap_dir(tmp, final)
    assert _tree(final) == {"manifest.json": "old"}
    assert _tree(tmp) == {"manifest.json": "new"}  # the caller's to delete
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp", "prepared"]


def test_atomic_swap_dir_removes_side_folders_of_killed_swaps_only(tmp_path):
    """A swap killed between its renames leaves ``.<name>.old-<pid>``: the next swap removes it
    when that pid is gone, and leaves one of a live process (a swap in progress) alone."""
    final = _new_folder(tmp_path / "export", {"w": "v1"})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that existed and is gone
    _new_folder(tmp_path / f".export.old-{dead.pid}", {"w": "v0"})
    live = _new_folder(tmp_path / f".export.old-{os.getppid()}", {"w": "other"})
    atomic_swap_dir(_new_folder(tmp_path / ".t", {"w": "v2"}), final)
    assert _tree(final) == {"w": "v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])


def test_say_goes_to_stderr_unless_quiet(capsys, monkeypatch):
    monkeypatch.delenv("MTREC_QUIET", raising=False)
    say("hello")
    say("not shown", enabled=False)
    monkeypatch.setenv("MTREC_QUIET", "1")
    say("quiet")
    say("shown anyway", enabled=True)
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", "hello\nshown anyway\n")
