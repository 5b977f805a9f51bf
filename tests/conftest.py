"""Suite-wide settings and shared fixtures.

Multi-process tests start real process groups (gloo) on 2 cores: one thread per rank keeps
them from oversubscribing the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_environ():
    """Undo any os.environ change a test makes (monkeypatch's delenv of an absent key records
    nothing, so a later direct write would leak): a leaked GLOO_SOCKET_IFNAME=lo once made every
    later 2-node srun job hang."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sen12ms_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic SEN12MS (real layout, 32x32 patches) packed into 8 small shards."""
    from satfuse.data.shard_writer import shard_dataset
    from satfuse.data.synth import write_sen12ms

    base = tmp_path_factory.mktemp("sen12ms")
    write_sen12ms(base / "raw", scenes=2, patches_per_scene=24, seed=0, size=32)
    shard_dataset(base / "raw", "sen12ms", base / "shards", maxcount=6, seed=0)
    return base / "shards"


@pytest.fixture(scope="session")
def sen12ms_heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out scenes (another seed) for retrieval accuracy."""
    from satfuse.data.shard_writer import shard_dataset
    from satfuse.data.synth import write_sen12ms

    base = tmp_path_factory.mktemp("sen12ms_heldout")
    write_sen12ms(base / "raw", scenes=1, patches_per_scene=16, seed=99, size=32)
    shard_dataset(base / "raw", "sen12ms", base / "shards", maxcount=8, seed=1)
    return base / "shards"
