"""The per-sample transform both loaders run in their workers, and the batch collation.

One job: a raw shard sample -> model inputs. Decode -> crop (seeded by seed, epoch, key) ->
normalise (deferred to `collate`, which casts the crop straight into the batch tensor) ->
optional SimCLR views. `FatalDataError` is bad data or config that skipping cannot fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from satfuse.data.packing.normalize import S2_RGB, BandStats, normalize, normalize_into
from satfuse.data.reading.augment import simclr_views
from satfuse.data.reading.stream_io import RawSample, decode_label, decode_pair
from satfuse.data.reading.stream_plan import stable_seed
from satfuse.registry import METHODS


class FatalDataError(Exception):
    """Bad data or config that skipping cannot fix (e.g. crop larger than the patch)."""


@dataclass
class SampleTransform:
    """Decode -> crop (seeded by seed, epoch, key) -> normalise -> optional SimCLR views."""

    s1: BandStats
    s2: BandStats
    seed: int
    crop: int
    method: str = "dual_simclr"
    simclr_input: str = "s2_rgb"
    center: bool = False
    labels: bool = False  # pretraining never reads label members

    def __post_init__(self) -> None:
        self.views = METHODS.get(self.method).views  # the method says whether it reads view1/view2

    def __call__(self, raw: RawSample, epoch: int) -> dict[str, Any]:
        rng = np.random.default_rng(stable_seed("sample", self.seed, epoch, raw.key)) if self._uses_rng else None
        window: list[int] = []

        def choose(h: int, w: int) -> tuple[int, int, int]:
            window.extend(self._window(h, w, rng, raw))
            return window[0], window[1], window[2]

        s1, s2 = decode_pair(raw, choose, len(self.s2.mean))  # read-only views: pixels are read by `collate`
        item: dict[str, Any] = {"s1": Pending(s1, self.s1), "s2": Pending(s2, self.s2), "key": raw.key}
        label = decode_label(raw) if self.labels else None
        if label is not None:
            top, left, size = window
            lab = label[1][:, top : top + size, left : left + size] if size else label[1]
            item[label[0]] = np.ascontiguousarray(lab)
        if self.views:
            item["s1"], item["s2"] = normalize(s1, self.s1), normalize(s2, self.s2)
            item["view1"], item["view2"] = self._views(item, rng)
        return item

    @property
    def _uses_rng(self) -> bool:
        """The per-sample RNG (seed, epoch, key) feeds random crops and SimCLR views only;
        building it costs ~15 us, so it is skipped when neither is drawn (same streams)."""
        return self.views or (self.crop > 0 and not self.center)

    def _window(self, h: int, w: int, rng: np.random.Generator | None, raw: RawSample) -> tuple[int, int, int]:
        """(top, left, size) of the crop; size 0 = the full patch."""
        c = self.crop
        if c <= 0:
            return 0, 0, 0
        if c > h or c > w:
            raise FatalDataError(
                f"shard #{raw.shard} sample {raw.key}: data.crop={c} is larger than the {h}x{w} patch; "
                f"set data.crop <= {min(h, w)} (0 = full patch)"
            )
        if self.center or rng is None:  # no rng only for centre crops (see _uses_rng)
            return (h - c) // 2, (w - c) // 2, c
        return int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1)), c

    def _views(self, item: dict[str, Any], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.simclr_input == "s2_rgb":
            x = item["s2"][S2_RGB]
        elif self.simclr_input == "s2":
            x = item["s2"]
        else:
            x = np.concatenate([item["s1"], item["s2"]], axis=0)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        return simclr_views(torch.from_numpy(np.ascontiguousarray(x)), gen, int(x.shape[-1]))


@dataclass
class Pending:
    """A cropped raw array - a view of the shard's map or of the member bytes - whose
    normalisation is deferred to `collate`, which casts it straight into the batch tensor
    and standardises it there in place: the crop's pixels are read once, never copied alone."""

    raw: np.ndarray
    stats: BandStats


def batch_fields(items: list[dict[str, Any]]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of every tensor `collate` makes from `items` (a batch buffer's layout)."""
    out = {}
    for name, v in items[0].items():
        if name == "key":
            continue
        if isinstance(v, Pending):
            out[name] = (torch.float32, (len(items), *v.raw.shape))
        elif isinstance(v, torch.Tensor):
            out[name] = (v.dtype, (len(items), *v.shape))
        else:
            out[name] = (torch.from_numpy(np.empty(0, dtype=np.asarray(v).dtype)).dtype, (len(items), *np.shape(v)))
    return out


def collate(items: list[dict[str, Any]], out: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Stack a list of samples; arrays become tensors, keys a list. With `out` (tensors of
    `batch_fields(items)`, e.g. a reused shared-memory buffer) the batch is written there."""
    batch: dict[str, Any] = {"key": [it["key"] for it in items]}
    for name in items[0]:
        if name == "key":
            continue
        vals = [it[name] for it in items]
        if isinstance(vals[0], Pending):
            if out is not None:
                tensor = out[name]
            else:
                tensor = torch.empty((len(vals), *vals[0].raw.shape), dtype=torch.float32)
                if get_worker_info() is not None:  # written once, straight into what the main process maps
                    tensor.share_memory_()
            rows = tensor.numpy()
            for i, v in enumerate(vals):
                normalize_into(v.raw, v.stats, rows[i])
            batch[name] = tensor
        elif isinstance(vals[0], torch.Tensor):
            batch[name] = torch.stack(vals, out=out[name]) if out is not None else torch.stack(vals)
        elif out is not None:
            np.stack(vals, out=out[name].numpy())
            batch[name] = out[name]
        else:
            batch[name] = torch.from_numpy(np.stack(vals))
    return batch

