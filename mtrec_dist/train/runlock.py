"""One writer per run folder, and no Ray process outliving the driver that started it
(docs/design.md §6 Checkpoints and resume).

**The run-folder lock.** Two ``mtrec train`` runs into one ``run_dir`` would each adopt the
other's checkpoints and overwrite ``export/`` and ``config.yaml``; a "folder already has
checkpoints" check before the workers start is a race. So the driver holds an exclusive
``flock`` on ``RUN_DIR/.lock`` for the run's life (:func:`run_lock`), taken before anything is
read or written there; a second writer is refused at once, naming the holder's pid and host.
The kernel drops the lock when the holder exits however it dies (SIGKILL included), so a lock
whose holder is gone is never in the way: the next run takes it and rewrites the holder line.
The descriptor is close-on-exec, so no Ray process started by the driver inherits it.

**The local Ray session dies with the driver.** ``ray.init()`` without an address starts Ray's
processes as children of the driver. Ray ties the GCS and the raylet (and through it the
workers) to the driver's life, but not its dashboard and runtime-env agents, which outlive a
killed driver. :func:`reap_at_exit` starts a watcher (this file run as a script, standard
library only) that holds the read end of a pipe whose write end only the driver holds, and
records the driver's descendants every half second. End of file on that pipe (the driver
ended, whatever the signal) makes it stop every recorded process still running (SIGTERM,
then SIGKILL after 5 s), checking each one's start time so a reused pid is never hit. Ray
stays up for the driver's later runs (a sweep's trials, the demo's evaluation). A driver
attached to an existing cluster (``RAY_ADDRESS``) starts no watcher: that cluster is not ours
to stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"  # RUN_DIR/.lock: {"pid", "host", "started"} of the run writing the folder
POLL_S = 0.5
KILL_GRACE_S = 5.0


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``RUN_DIR/.lock`` for the block, or raise :class:`RunFolderBusy` naming the holder."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(path)
        os.close(fd)
        raise RunFolderBusy(
            f"run_dir={run_dir} is in use by pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')} (since {holder.get('started', '?')}; lock {path}): a "
            "second run would mix its checkpoints, logs and export with that run's. Wait for "
            "it to end or stop it, or set run_dir to another folder"
        ) from None
    try:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would race a new holder)


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


_WATCHER: subprocess.Popen | None = None


def reap_at_exit() -> None:
    """From now until this process ends, however it ends, a watcher stops the processes it
    started that are still running then (Ray's agents survive a killed driver). Once per
    process; Linux only (descendants are read from /proc)."""
    global _WATCHER
    if _WATCHER is not None or not sys.platform.startswith("linux"):
        return
    _WATCHER = subprocess.Popen(
        [sys.executable, "-I", __file__, str(os.getpid())],  # -I: stdlib only
        stdin=subprocess.PIPE,  # our end is closed by the kernel when we exit, never before
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the driver's group must not stop the watcher
    )


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                out[int(entry)] = (int(stat[1]), int(stat[19]))
            except (OSError, IndexError, ValueError):
                continue
    return out


def descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of every descendant of ``root`` in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found[c] = table[c][1]
                todo.append(c)
    return found


def _alive(pid: int, started: int) -> bool:
    table = _proc_table()
    return pid in table and table[pid][1] == started


def _watch(driver: int) -> None:
    """Record ``driver``'s descendants until its pipe closes (it exited or died), then stop
    those still running."""
    me = os.getpid()
    seen: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 64):
            break  # end of file: the driver is gone
        seen.update(descendants(driver, _proc_table()))
        seen.pop(me, None)
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 0.0)):
        left = {p: s for p, s in seen.items() if _alive(p, s)}
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        end = time.monotonic() + wait
        while left and time.monotonic() < end:
            time.sleep(0.1)
            left = {p: s for p, s in left.items() if _alive(p, s)}
        if not left:
            return


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
