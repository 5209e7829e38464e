"""The ``gpu`` marker: without CUDA a marked test is reported as skipped with the reason (never
as passed); checked by running pytest on a marked test in a subprocess and reading its report."""

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
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_needs_cuda():\n    assert False\n"
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
    assert "1 skipped" in out and "passed" not in out and "failed" not in out, out
    assert "needs CUDA: torch.cuda.is_available() is False" in out, out
