"""Tune DeepSpeed: ``python launch/tune_deepspeed.py --config configs/X.yaml --space S.yaml [--out DIR] [key.sub=value ...]``.

Runs the same way on a laptop (a local Ray instance is started) and under
``ray job submit --working-dir . -- python launch/tune_deepspeed.py ...`` against a cluster.
Writes DIR/results.{csv,md}, DIR/best_deepspeed.json and DIR/best_command.txt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, under --working-dir

from mtrec_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune-deepspeed", *sys.argv[1:]]))
