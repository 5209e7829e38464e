"""Small helpers shared by every command: atomic writes, hashing, progress with ETA."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open ``path`` for writing through a temp file beside it, renamed into place on success.

    A crash or an exception leaves the old file (or none) and no temp file: readers never see
    half a file. Permissions follow the umask like an ordinary ``open`` (mkstemp's are 0600).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kw = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_swap_dir(tmp: str | Path, final: str | Path) -> None:
    """Put the finished folder ``tmp`` at ``final``, replacing the folder there, if any.

    A folder cannot be renamed over a non-empty one, so the old folder first moves aside
    (``.<name>.old-<pid>`` beside it) and is deleted once ``tmp`` took its place: a reader sees
    the old folder or the new one, never a half-written one (docs/design.md §7). A failure
    between the two renames moves the old folder back, so ``final`` is never left missing; a
    side folder left by a killed process is removed by the next swap.
    """
    tmp, final = Path(tmp), Path(final)
    for side in final.parent.glob(f".{final.name}.old-*"):  # left by a swap that was killed
        pid = side.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(side, ignore_errors=True)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def say(msg: str, enabled: bool | None = None) -> None:
    """A one-line report for a person on stderr, so that stdout stays parseable.

    ``enabled=None``: shown unless ``MTREC_QUIET`` is set (as in Ray workers); a command with a
    progress switch of its own passes it.
    """
    if enabled is None:
        enabled = os.environ.get("MTREC_QUIET", "") == ""
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def ray_address() -> str:
    """The Ray to use: the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else
    a new local one.

    ``ray.init()`` without an address attaches to whatever ``/tmp/ray/ray_current_cluster``
    names, the last ``ray start`` (or Ray test cluster) on the host, even one long dead: a local
    run would then hang on a stale GCS address or refuse ``num_cpus``. ``"local"`` always
    starts a fresh Ray that dies with this process (docs/design.md §6).
    """
    return os.environ.get("RAY_ADDRESS") or "local"


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """[n + 1] int64 start offsets of ``n`` consecutive slices of a flat array with these
    ``lengths`` (the last entry is the total): slice i is ``flat[out[i] : out[i + 1]]``."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def _fmt_rate(rate: float, unit: str) -> str:
    """``1,234 it/s``, or ``2.5 s/it`` when slower than one per second."""
    if 0 < rate < 1:
        return f"{1 / rate:.1f} s/{unit.rstrip('s') or unit}"
    return f"{rate:,.0f} {unit}/s"


class Progress:
    """A console progress line with rate and ETA, printed at most every ``every`` seconds.

    Writes to stderr so that stdout stays parseable; prints whole lines (no carriage returns)
    because Ray and CI logs keep every line anyway.
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        unit: str = "it",
        every: float = 5.0,
        sink: Callable[[str], None] | None = None,
    ):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.sink = sink
        self.n = 0
        self.t0 = self.last = time.monotonic()
        self.enabled = os.environ.get("MTREC_QUIET", "") == ""

    def update(self, k: int = 1, extra: str = "") -> None:
        self.n += k
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._print(extra)

    def _print(self, extra: str = "") -> None:
        if not self.enabled:
            return
        el = time.monotonic() - self.t0
        rate = self.n / el if el > 0 else 0.0
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            pct = 100.0 * self.n / self.total
            eta_s = _fmt_secs(eta) if eta != float("inf") else "?"
            msg = f"{self.what}: {self.n}/{self.total} {self.unit} ({pct:.1f}%) {_fmt_rate(rate, self.unit)}, elapsed {_fmt_secs(el)}, ETA {eta_s}"
        else:
            msg = f"{self.what}: {self.n} {self.unit} {_fmt_rate(rate, self.unit)}, elapsed {_fmt_secs(el)}"
        line = msg + (f" {extra}" if extra else "")
        if self.sink is not None:
            self.sink(line)
        else:
            say(line, enabled=True)

    def close(self, extra: str = "") -> float:
        """Print the final line; return the elapsed seconds."""
        self._print(extra)
        return time.monotonic() - self.t0


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and of waited-for children), in MiB."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, child_kb) / 1024.0
