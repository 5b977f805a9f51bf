"""The workers' batch ring on CUDA (marked `cuda`, run by `make gpu-check`): buffers pinned in
place, and a non-blocking copy from a dropped batch is never overwritten before it runs. The
CPU side of the ring is tested in tests/data/test_batch_ring.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.data.reading.shard_sets import resolve_shards
from tests.data.loader_shards import data_cfg, make_shards


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_ring_on_cuda(tmp_path: Path) -> None:
    """On CUDA the ring's buffers are page-locked in place, and a non-blocking copy queued
    before the batch is dropped still reads the batch it was queued for."""
    ss = resolve_shards(str(make_shards(tmp_path, [23, 17, 30, 9, 21, 25, 12])))
    it = iter(PretrainLoader(ss, data_cfg(num_workers=2, crop=0), rank=0, world_size=1, seed=3, pin_memory=True))
    on_gpu, expected = [], []
    for _ in range(12):
        b = next(it)
        assert b["s1"].is_pinned() and b["s2"].is_pinned()
        expected.append(b["s2"].clone())
        torch.cuda._sleep(50_000_000)  # the GPU is busy, so the copy below runs well after next()
        on_gpu.append(b["s2"].to("cuda", non_blocking=True))
        del b  # the slot may go back to its worker: only after the copy has run
    torch.cuda.synchronize()
    for gpu, cpu in zip(on_gpu, expected, strict=True):
        assert torch.equal(gpu.cpu(), cpu)
    del it
