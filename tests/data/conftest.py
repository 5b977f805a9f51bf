"""Fixtures of the data-layer tests: small synthetic trees in the real layouts.

The trees are made once per session (32x32 patches: the layout and packer must not assume
256) and copied by tests that damage them, so every test starts from a known-good tree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from satfuse.data.sources.synth import write_dfc2020, write_sen12ms
from tests.data.loader_shards import make_shards


@pytest.fixture(scope="session")
def sen12ms_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 scenes x 6 patches of 32x32 SEN12MS (s1, s2, lc) + split lists. Do not modify."""
    root = tmp_path_factory.mktemp("data_sen12ms") / "SEN12MS"
    write_sen12ms(root, scenes=2, patches_per_scene=6, seed=3, size=32)
    return root


@pytest.fixture(scope="session")
def dfc_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 validation + 4 test 32x32 DFC2020 patches (s1, s2, dfc). Do not modify."""
    root = tmp_path_factory.mktemp("data_dfc") / "DFC2020"
    write_dfc2020(root, n_validation=5, n_test=4, seed=3, size=32)
    return root


@pytest.fixture()
def tree(sen12ms_tree: Path, tmp_path: Path) -> Path:
    """A private copy of the SEN12MS tree that a test may damage."""
    dst = tmp_path / "src"
    shutil.copytree(sen12ms_tree, dst)
    return dst


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """7 shards of uneven sizes (137 samples), 16x16 patches (loader tests; helpers in loader_shards.py)."""
    return make_shards(tmp_path, [23, 17, 30, 9, 21, 25, 12])
