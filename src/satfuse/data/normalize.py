"""Per-sensor normalisation, explicit and stored with every checkpoint.

Why explicit: silently dividing by 255 (or not clipping SAR dB) is the classic EO bug. The
authors clip S1 to [-25, 0] dB and S2 to [0, 10000]; we then standardise per band with the
mean/std that the sharding tool measured while packing (`manifest.json` -> `stats`), clipped
to the same range so the statistics match the clipped values.

NaN/Inf never reach the model: the sharding tool refuses them, and `normalize` maps any that
slip through (e.g. real SEN12MS S1 nodata) to the band mean (0 after standardisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

S1_BANDS = ["VV", "VH"]
S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
S2_RGB = [3, 2, 1]  # B4, B3, B2


@dataclass(frozen=True)
class BandStats:
    """Per-band statistics of one sensor (lists of length = bands)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    clip: tuple[float, float]

    @classmethod
    def from_manifest(cls, stats: dict, sensor: str, clip: list[float] | tuple[float, float]) -> BandStats:
        s = stats[sensor]
        lo, hi = float(clip[0]), float(clip[1])
        mean = tuple(float(np.clip(m, lo, hi)) for m in s["mean"])
        std = tuple(max(float(v), 1e-6) for v in s["std"])
        return cls(mean=mean, std=std, clip=(lo, hi))

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "clip": list(self.clip)}

    @cached_property
    def mean32(self) -> np.ndarray:
        """The means as float32 (C, 1, 1), built once (the loader normalises every sample)."""
        return np.asarray(self.mean, dtype=np.float32)[:, None, None]

    @cached_property
    def std32(self) -> np.ndarray:
        return np.asarray(self.std, dtype=np.float32)[:, None, None]


def normalize(x: np.ndarray, stats: BandStats) -> np.ndarray:
    """(C, H, W) raw array -> float32 standardised array; NaN/Inf -> band mean."""
    out = np.empty(x.shape, dtype=np.float32)
    normalize_into(x, stats, out)
    return out


def normalize_into(x: np.ndarray, stats: BandStats, out: np.ndarray) -> None:
    """`normalize(x, stats)` written into the float32 array `out` of x's shape.

    `x` may be a strided view (a crop of a memory-mapped member): the cast reads only the
    crop's pixels, and every later step runs in place on `out` (cache-hot). The NaN/Inf
    mask is built only when a float input is not all finite, which one sum tells (it is
    finite only if every element is; a sum that overflows just takes the exact path)."""
    mean, std = stats.mean32, stats.std32
    np.copyto(out, x, casting="unsafe")
    if x.dtype.kind == "f" and not np.isfinite(np.sum(out)):
        bad = ~np.isfinite(out)
        out[bad] = np.broadcast_to(mean, out.shape)[bad]
    np.clip(out, np.float32(stats.clip[0]), np.float32(stats.clip[1]), out=out)
    out -= mean
    out /= std
