"""The console of a training run shows our progress and results, not Ray's internals
(docs/design.md §9 The console).

Ray Train echoes every line of every actor it runs (its controller, placement-group cleaner,
dataset manager, the workers' DeepSpeed banners) on the driver. A person watching ``make demo``
or ``mtrec train`` needs three things from the console: progress with ETA, warnings they can act
on, and results. So:

- workers do not echo to the driver (``ray.init(log_to_driver=False)``); Ray keeps everything in
  its own log folder, named once on the console;
- rank 0 writes each line it means for a person (the progress line and the dev metrics) to
  ``RUN_DIR/console.log`` through :class:`ConsoleLog`; the driver's own checks and notes are
  printed by the driver before workers start (what a worker prints stays in Ray's logs);
- the driver follows that file while ``trainer.fit()`` runs (:func:`follow`) and prints it;
- Ray's own Python loggers on the driver go to ``RUN_DIR/logs/ray_driver.log``
  (:func:`ray_driver_logs_to`), errors included there and in the exception ``fit()`` raises.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

CONSOLE_FILE = "console.log"
RAY_DRIVER_LOG = "logs/ray_driver.log"


class ConsoleLog:
    """Lines for a person: printed here (stderr) and appended to ``RUN_DIR/console.log`` so
    the driver can show them when this process is a Ray worker whose output is not echoed."""

    def __init__(self, run_dir: str | Path, echo: bool = True):
        self.path = Path(run_dir) / CONSOLE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.echo = echo

    def __call__(self, line: str) -> None:
        self.file.write(line.rstrip("\n") + "\n")
        self.file.flush()
        if self.echo:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.file.close()


def follow(
    path: str | Path, stop: threading.Event, out: TextIO | None = None, poll_s: float = 0.2
) -> None:
    """Print the lines appended to ``path`` after this call until ``stop`` is set (then the
    rest). Starts at the file's current end, so a resumed run does not replay old lines."""
    path = Path(path)
    out = out or sys.stderr
    offset = path.stat().st_size if path.is_file() else 0
    pending = ""
    while True:
        done = stop.is_set()
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                print(line, file=out, flush=True)
        if done:
            if pending:
                print(pending, file=out, flush=True)
            return
        time.sleep(poll_s)


@contextlib.contextmanager
def following(path: str | Path, out: TextIO | None = None) -> Iterator[None]:
    """Run :func:`follow` in a thread for the duration of the block."""
    stop = threading.Event()
    th = threading.Thread(target=follow, args=(path, stop, out), daemon=True, name="console")
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=10)


def say_once(run_dir: str | Path):
    """A ``say`` for a worker's one-off notes (e.g. the checkpoint reader's "ignoring
    incomplete step_..."): appended to ``console.log``, which the driver shows, and printed to
    this process's stderr (Ray's worker log)."""

    def say(line: str) -> None:
        log = ConsoleLog(run_dir)
        try:
            log(line)
        finally:
            log.close()

    return say


@contextlib.contextmanager
def ray_driver_logs_to(path: str | Path) -> Iterator[Path]:
    """Send the driver's ``ray`` loggers to ``path`` instead of the console for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("ray", "ray.train", "ray.data", "ray.tune")]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler] if lg.name == "ray" else []
        lg.propagate = lg.name != "ray"
    try:
        yield path
    finally:
        for lg, handlers, prop in saved:
            lg.handlers, lg.propagate = handlers, prop
        handler.close()
