"""Pick the trainer: the single-process reference loop for now (see train/local.py).

The distributed Ray Train + DeepSpeed trainer replaces this dispatch when it lands; keeping
one entry point means ``mtrec train``, ``launch/train.py`` and the demo never change.
"""

from __future__ import annotations

from mtrec_dist.config import Config


def run_training(cfg: Config, resume: str | None = None) -> dict:
    if resume:
        raise ValueError("--resume needs the distributed trainer (not available yet)")
    from mtrec_dist.train.local import train_local

    return train_local(cfg)
