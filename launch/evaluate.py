"""Evaluate: ``python launch/evaluate.py --run RUN_DIR --split dev`` (also under ray job submit)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
