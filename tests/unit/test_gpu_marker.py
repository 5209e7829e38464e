"""The ``gpu`` marker: without CUDA a marked test is reported as skipped with the reason (never
as passed), and a test that only has "gpu" in its name or parameter id still runs; checked by
running pytest on such tests in a subprocess and reading its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the test would run")
def test_marked_test_is_skipped_with_the_reason_without_cuda(tmp_path):
    probe = REPO / "tests" / "unit" / f"_probe_gpu_{tmp_path.name}.py"
    probe.write_text(
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_needs_cuda():\n    assert False\n\n\n"
        # a "gpu" in a name or parameter id is not the marker: this one runs
        "@pytest.mark.parametrize('kind', ['gpu'])\ndef test_gpu_named(kind):\n    assert kind\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-rs", "-q", "-p", "no:cacheprovider", str(probe)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    finally:
        probe.unlink()
    assert "1 passed, 1 skipped" in out and "failed" not in out, out
    assert "needs CUDA: torch.cuda.is_available() is False" in out, out
