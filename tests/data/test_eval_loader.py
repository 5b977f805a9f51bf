"""EvalLoader: finite, deterministic, every sample exactly once across ranks, equal batch
counts per rank with a mask for the padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from satfuse.data.reading.eval_loader import EvalLoader
from satfuse.data.reading.shard_sets import resolve_shards
from satfuse.utils import SatfuseError
from tests.data.loader_shards import data_cfg, make_shards, sample_ids


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_each_sample_once_equal_batches(tmp_path: Path, world: int) -> None:
    ss = resolve_shards(str(make_shards(tmp_path, [7, 3, 5], label=True)))
    seen, lengths = [], set()
    for r in range(world):
        ld = EvalLoader(ss, data_cfg(), rank=r, world_size=world, batch_size=2, crop=8)
        batches = list(ld)
        assert len(batches) == len(ld)
        lengths.add(len(batches))
        for b in batches:
            assert b["s2"].shape == (2, 13, 8, 8) and b["dfc"].shape == (2, 1, 8, 8)
            assert not b["s2"][~b["mask"]].any()
            ids = sample_ids({"key": [k for k, m in zip(b["key"], b["mask"], strict=True) if m]})
            seen += ids
            dfc = b["dfc"][b["mask"]][:, 0, 0, 0].tolist()
            assert dfc == [1 + i % 10 for i in ids]
    assert len(lengths) == 1
    assert sorted(seen) == list(range(15))


def test_deterministic_center_crop(tmp_path: Path) -> None:
    ss = resolve_shards(str(make_shards(tmp_path, [6, 6])))
    a = list(EvalLoader(ss, data_cfg(), rank=0, world_size=1, batch_size=4, crop=8))
    b = list(EvalLoader(ss, data_cfg(), rank=0, world_size=1, batch_size=4, crop=8))
    full = list(EvalLoader(ss, data_cfg(), rank=0, world_size=1, batch_size=4, crop=0))
    assert all(torch.equal(x["s2"], y["s2"]) for x, y in zip(a, b, strict=True))
    assert torch.equal(a[0]["s2"], full[0]["s2"][:, :, 4:12, 4:12])


def test_corrupt_sample_is_masked_or_fatal(tmp_path: Path) -> None:
    ss = resolve_shards(str(make_shards(tmp_path, [5, 5], corrupt=frozenset({2}))))
    ld = EvalLoader(ss, data_cfg(), rank=0, world_size=1, batch_size=4)
    batches = list(ld)
    assert ld.decode_errors == 1 and sum(int(b["mask"].sum()) for b in batches) == 9
    fatal = EvalLoader(ss, data_cfg(on_decode_error="fatal"), rank=0, world_size=1, batch_size=4)
    with pytest.raises(SatfuseError, match="synth-000000.tar: sample ROIs1158_spring_0_p2 failed to decode"):
        list(fatal)
