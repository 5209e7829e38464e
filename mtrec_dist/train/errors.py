"""Training's own failure type, in a module with no heavy imports.

``cli.py`` catches it around every subcommand; importing it from ``launch.py`` (which imports
torch, transformers and the models) would make ``mtrec --help`` and ``mtrec score`` pay for all
of that. ``launch.py`` raises it and still exports it under its old name.
"""

from __future__ import annotations


class TrainingFailed(RuntimeError):
    """A worker (or Ray Train's controller) failed: our one-line message and the full log."""
