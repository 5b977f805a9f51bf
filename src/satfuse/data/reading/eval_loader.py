"""Held-out evaluation loader: a finite, deterministic pass over a shard set, each sample once across ranks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from satfuse.config import DataConfig
from satfuse.data.packing.normalize import BandStats
from satfuse.data.reading.sample_transform import FatalDataError, SampleTransform, collate
from satfuse.data.reading.shard_sets import ShardSet
from satfuse.data.reading.stream_io import RawSample, read_shard
from satfuse.data.reading.stream_plan import Run, split_runs
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)


class EvalLoader:
    """Finite, deterministic pass over a shard set: each sample exactly once across ranks.

    Rank r reads the r-th contiguous block of the samples (shard order), so it opens only the
    shards it needs. Every rank yields the same number of batches; rows past a rank's block,
    and undecodable samples with on_decode_error=skip, are zero rows with mask False.
    """

    def __init__(
        self, shards: ShardSet, cfg: DataConfig, *, rank: int, world_size: int, batch_size: int, crop: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise SatfuseError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise SatfuseError(f"eval batch_size={batch_size}; it must be >= 1")
        self.shards, self.cfg, self.batch_size = shards, cfg, batch_size
        s1 = BandStats.from_manifest(shards.stats, "s1", cfg.s1_clip)
        s2 = BandStats.from_manifest(shards.stats, "s2", cfg.s2_clip)
        self.transform = SampleTransform(s1, s2, 0, crop, center=True, labels=True)
        all_runs: list[Run] = [(s, 0, c) for s, c in enumerate(shards.counts) if c > 0]
        self.runs = split_runs(all_runs, world_size)[rank]
        longest = -(-shards.total // world_size)
        self.n_batches = -(-longest // batch_size)
        self.decode_errors = 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows: list[dict[str, Any] | None] = []
        template: dict[str, Any] | None = None
        emitted = 0
        for raw in self._samples():
            item = self._decode(raw)
            template = template or item
            rows.append(item)
            if len(rows) == self.batch_size:
                yield self._batch(rows, template)
                rows, emitted = [], emitted + 1
        while emitted < self.n_batches:
            rows += [None] * (self.batch_size - len(rows))
            yield self._batch(rows, template)
            rows, emitted = [], emitted + 1

    def _samples(self) -> Iterator[RawSample]:
        for shard, lo, hi in self.runs:
            yield from read_shard(self.shards.urls[shard], shard, set(range(lo, hi)), hi - 1)

    def _decode(self, raw: RawSample) -> dict[str, Any] | None:
        url = self.shards.urls[raw.shard]
        try:
            return self.transform(raw, 0)
        except FatalDataError as exc:
            raise SatfuseError(f"{url}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - untrusted bytes
            if self.cfg.on_decode_error == "fatal":
                raise SatfuseError(f"{url}: sample {raw.key} failed to decode ({exc}); fix the shard "
                                   "or set data.on_decode_error=skip") from exc
            self.decode_errors += 1
            log.warning("%s: skipping sample %s: %s", url, raw.key, exc)
            return None

    def _template(self) -> dict[str, Any]:
        """Shapes for an all-padding rank: decode the first readable sample of the set."""
        for shard, count in enumerate(self.shards.counts):
            if count:
                for raw in read_shard(self.shards.urls[shard], shard, {0}, 0):
                    item = self._decode(raw)
                    if item is not None:
                        return item
        raise SatfuseError(f"{self.shards.spec}: no readable sample to evaluate on")

    def _batch(self, rows: list[dict[str, Any] | None], template: dict[str, Any] | None) -> dict[str, Any]:
        if template is None or any(r is None for r in rows):
            template = template or next((r for r in rows if r is not None), None) or self._template()
        filled = [r if r is not None else {**template, "key": ""} for r in rows]
        batch = collate(filled)
        mask = torch.tensor([r is not None for r in rows], dtype=torch.bool)
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                value[~mask] = 0
        batch["mask"] = mask
        return batch
