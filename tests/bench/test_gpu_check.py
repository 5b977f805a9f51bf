"""`make gpu-check` fails closed: on a machine where CUDA does not initialise (this CPU one) it
must FAIL, not pass with every `cuda` test skipped and the bench measuring the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hpc" / "gpu" / "gpu_check.sh"


def test_gpu_check_fails_at_once_where_cuda_does_not_initialise(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_PYTHON": sys.executable,
           "GPU_CHECK_SITE": str(tmp_path / "site"), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_PATCHES": "64", "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even where the suite has one
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert proc.returncode == 1, log
    assert "FAIL: CUDA did not initialise" in log
    assert not (tmp_path / "work").exists()  # stopped before synthesising anything


def test_a_skipped_cuda_test_fails_the_check() -> None:
    """The script's test step on a machine without CUDA: the skips are failures, exit non-zero."""
    text = SCRIPT.read_text()
    assert "bench gpu --device cuda" in text and "-m cuda tests/gpu" in text and "--fail-skips" in text
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-m", "cuda", "tests/gpu",
                           "-p", "no:cacheprovider", "--fail-skips"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert proc.stdout.count("and --fail-skips is set: nothing was tested") >= 6
    assert " passed" not in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1]
