"""Train: ``python launch/train.py --config configs/X.yaml [key.sub=value ...] [--resume RUN_DIR]``.

Runs the same way on a laptop (a local Ray instance is started) and under
``ray job submit --working-dir . -- python launch/train.py ...`` against a cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, under --working-dir

from mtrec_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
