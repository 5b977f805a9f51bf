"""Fixtures of the loader tests (helpers live in tests/loader/shards.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.loader.shards import make_shards


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """7 shards of uneven sizes (137 samples), 16x16 patches."""
    return make_shards(tmp_path, [23, 17, 30, 9, 21, 25, 12])
