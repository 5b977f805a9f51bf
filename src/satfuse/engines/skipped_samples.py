"""`data.max_skipped_fraction`: how many samples the loader may skip as undecodable before the
run stops. A truncated, damaged or altered shard must not quietly shrink the data set: the
loader skips such samples (and warns, naming them); this counts them over all ranks against
the samples read and fails every rank alike past the limit."""

from __future__ import annotations

import torch

from satfuse.config import DataConfig
from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.distributed.collectives import all_reduce_sum
from satfuse.utils import SatfuseError


class SkippedSamples:
    """The skipped-sample count of one run's loader and its limit."""

    def __init__(self, loader: PretrainLoader, data: DataConfig, global_batch: int) -> None:
        """`global_batch`: pairs read per optimizer step on all ranks (the trainer's, computed once)."""
        self.loader = loader
        self.limit = data.max_skipped_fraction
        self.shards = data.shards
        self.global_batch = global_batch

    def count(self) -> int:
        """Samples skipped so far on all ranks (collective when distributed)."""
        return int(all_reduce_sum(torch.tensor([int(self.loader.decode_errors)], dtype=torch.long)))

    def check(self, skipped: int, step: int) -> None:
        """Fail (on every rank alike) once more than data.max_skipped_fraction of the samples
        read by `step` were skipped."""
        read = skipped + step * self.global_batch
        if skipped and skipped > self.limit * max(read, 1):
            raise SatfuseError(
                f"{self.shards}: {skipped} of {read} samples read were skipped as undecodable "
                f"(truncated, damaged or altered shards; the warnings above name them), more than "
                f"data.max_skipped_fraction={self.limit}: check the shards with `satfuse shard verify`, "
                "or raise data.max_skipped_fraction to accept the loss"
            )
