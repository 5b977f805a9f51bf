"""Fixtures of the checkpoint tests: one uninterrupted 2-rank reference run, shared.

The reference is what every interrupted-and-resumed run must reproduce bitwise; running
it once per session keeps the area's tests within their time budget.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.checkpoint import launch

STEPS = 24
EVERY = 4


@dataclass
class Reference:
    run_dir: Path  # checkpoints of steps 16, 20, 24 (keep_last=3), world size 2
    final: Path  # rank 0's model+optimizer state after STEPS steps
    data_log: Path  # prefix of the per-rank data logs


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    base = tmp_path_factory.mktemp("ckpt_reference")
    ref = Reference(base / "run", base / "final.pt", base / "data")
    codes = launch.run(2, ["--run-dir", ref.run_dir, "--steps", STEPS, "--every", EVERY,
                           "--out", ref.final, "--data-log", ref.data_log], base / "logs")
    assert codes == [0, 0], launch.logs(base / "logs")
    return ref


@pytest.fixture()
def ref_copy(reference: Reference, tmp_path: Path) -> Path:
    """A private copy of the reference run directory (tests may damage it)."""
    dst = tmp_path / "run"
    shutil.copytree(reference.run_dir, dst)
    return dst
