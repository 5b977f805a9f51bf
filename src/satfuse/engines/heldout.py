"""Held-out retrieval during pretraining: S1 -> S2 top-1 over the whole of `data.val_shards`.

The held-out pairs go through the training model, normalised with the *training* statistics
(as the model saw its data), so they must hold the training bands: that is checked when the run
is built, not at its end. Evaluated every `train.eval_every` steps and at the end; chance is 1/N.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from satfuse.config import DataConfig
from satfuse.data.format.bands import manifest_bands
from satfuse.data.reading.eval_loader import EvalLoader
from satfuse.data.reading.shard_sets import ShardSet, resolve_shards, same_set_warning
from satfuse.distributed.collectives import all_reduce_sum
from satfuse.engines.setup import to_device
from satfuse.losses import retrieval_accuracy
from satfuse.models import method_class
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)


class HeldOutRetrieval:
    """The held-out set of one run (`data.val_shards`) and its retrieval metric."""

    def __init__(self, train_set: ShardSet, data: DataConfig, bands: dict[str, list[str]], rank: int,
                 world_size: int) -> None:
        """Resolve `data.val_shards`, warn when it overlaps the training set `train_set`, and
        refuse other `bands` than the training shards' now rather than at the end."""
        val_set = resolve_shards(data.val_shards)
        overlap = same_set_warning(train_set, val_set, "data.shards", "data.val_shards")
        if overlap and rank == 0:
            log.warning("%s", overlap)
        val = manifest_bands(val_set.manifest, data.val_shards)
        if val != bands:
            raise SatfuseError(
                f"band mismatch: data.val_shards={data.val_shards} holds {val}, data.shards={data.shards} "
                f"holds {bands}; evaluate on shards with the training bands"
            )
        self.data, self.rank, self.world_size = data, rank, world_size
        self.train_stats = train_set.stats

    @torch.no_grad()
    def evaluate(self, module: nn.Module, method: str, device: torch.device,
                 autocast: Callable[[], AbstractContextManager]) -> tuple[float | None, float | None]:
        """(top-1, chance) of `module` (the bare model, `model.method` = `method`) on every
        rank's share of the held-out set; (None, None) for a single-modality method."""
        kind = method_class(method)
        if not kind.cross_modal:
            log.info("held-out retrieval is S1 -> S2: not defined for single-modality %s", kind.method)
            return None, None
        # held-out pairs are normalised with the *training* statistics, as the model saw them
        shards = dataclasses.replace(resolve_shards(self.data.val_shards), stats=self.train_stats)
        loader = EvalLoader(shards, self.data, rank=self.rank, world_size=self.world_size,
                            batch_size=self.data.batch_size, crop=self.data.crop)
        module.eval()
        za, zb = [], []
        for batch in loader:
            mask = batch["mask"].bool()
            batch = to_device(batch, device)
            with autocast():
                a, b = kind.heldout_pair(module(batch))
            za.append(a.float().cpu()[mask])
            zb.append(b.float().cpu()[mask])
        a, b = torch.cat(za), torch.cat(zb)
        n = all_reduce_sum(torch.tensor([a.shape[0]], dtype=torch.long))
        top1 = retrieval_accuracy(a, b)
        chance = 1.0 / max(1, int(n))
        log.info("held-out S1->S2 retrieval top-1: %.3f (chance %.4f, n=%d)", top1, chance, int(n))
        return top1, chance

