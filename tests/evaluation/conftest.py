"""Fixtures of the evaluation tests (helpers live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.evaluation.helpers import write_dfc_shards


@pytest.fixture(scope="session")
def dfc_shards(tmp_path_factory) -> dict[str, Path]:
    """Train (DFC validation split, 96 patches) and test (64 patches) shard sets, 32x32."""
    root = tmp_path_factory.mktemp("dfc_shards")
    return {"train": write_dfc_shards(root / "dfc_train", 96, 32, seed=1),
            "test": write_dfc_shards(root / "dfc_test", 64, 32, seed=2, roi="ROIs0000_test")}
