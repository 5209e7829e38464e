"""Predict: ``python launch/predict.py --run RUN_DIR [--run RUN_DIR2 ...] --split test --out
prediction.zip`` (several ``--run``: an ensemble, the mean of their scores)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
