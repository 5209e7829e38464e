"""Shared fixtures: one tiny synthetic MIND dataset, prepared once per test session."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MTREC_QUIET", "1")
REPO = Path(__file__).resolve().parents[1]
NO_CUDA = (
    "needs CUDA: torch.cuda.is_available() is False on this machine (pytest -m gpu on a GPU node)"
)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests are skipped, with the reason, where there is no CUDA: they show
    as SKIPPED in the summary (``-rs`` names them), never as passed."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a "gpu" in a name
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Synthetic MIND at scale tiny (seed 0) with its prepared folder; read-only for tests."""
    from mtrec_dist.config import load_config
    from mtrec_dist.data.prepare import prepare
    from mtrec_dist.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny") / "data"
    generate(root, scale="tiny", seed=0, progress=False)
    prepare(load_config(REPO / "configs" / "tiny.yaml", [f"data.root={root}"]), progress=False)
    return root


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    """A tiny-model config over the shared tiny dataset, with a fresh run folder."""
    from mtrec_dist.config import load_config

    def make(*overrides: str):
        return load_config(
            REPO / "configs" / "tiny.yaml",
            [f"data.root={tiny_data}", f"run_dir={tmp_path / 'run'}", *overrides],
        )

    return make
