"""Band statistics: measured while packing (exact, mergeable sums) and applied when reading.

One owner for both ends: the sharding tool accumulates per-band sums here (`sample_sums`,
`add_sums`, `finish_stats` -> manifest `stats`), and the loaders standardise with them
(`BandStats`, `normalize`).

Per-sensor normalisation is explicit and stored with every checkpoint.

Why explicit: silently dividing by 255 (or not clipping SAR dB) is the classic EO bug. The
authors clip S1 to [-25, 0] dB and S2 to [0, 10000]; we then standardise per band with the
mean/std that the sharding tool measured while packing (`manifest.json` -> `stats`), clipped
to the same range so the statistics match the clipped values.

NaN/Inf never reach the model: the sharding tool refuses them, and `normalize` maps any that
slip through (e.g. real SEN12MS S1 nodata) to the band mean (0 after standardisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

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


# --------------------------------------------------------------------------------------------
# Measuring: stats as exact, mergeable sums (S2 integers, S1 float64 combined in shard order)
# --------------------------------------------------------------------------------------------


def empty_sums(bands: int) -> dict[str, Any]:
    """The sums of no pixel, for `bands` bands."""
    return {"sum": [0] * bands, "sumsq": [0] * bands, "min": [None] * bands, "max": [None] * bands, "count": 0}


def sample_sums(array: np.ndarray) -> dict[str, Any]:
    """Per-band sums of one (C, H, W) array: exact Python ints for integer rasters (uint64
    accumulation of uint32 squares), float64 sums for float rasters."""
    flat = array.reshape(array.shape[0], -1)
    if np.issubdtype(array.dtype, np.integer):
        wide = flat.astype(np.uint64 if flat.dtype.itemsize > 2 else np.uint32)
        sums = flat.sum(axis=1, dtype=np.uint64)
        wide *= wide
        sumsq = wide.sum(axis=1, dtype=np.uint64)
        conv: Any = int
    else:
        x = flat.astype(np.float64)
        sums, sumsq, conv = x.sum(axis=1), np.einsum("ij,ij->i", x, x), float
    return {
        "sum": [conv(v) for v in sums],
        "sumsq": [conv(v) for v in sumsq],
        "min": [conv(v) for v in flat.min(axis=1)],
        "max": [conv(v) for v in flat.max(axis=1)],
        "count": int(flat.shape[1]),
    }


def add_sums(acc: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """acc + other, in this order (float sums are combined in a fixed order everywhere)."""
    def pick(a: Any, b: Any, f: Any) -> Any:
        return b if a is None else a if b is None else f(a, b)

    return {
        "sum": [a + b for a, b in zip(acc["sum"], other["sum"], strict=True)],
        "sumsq": [a + b for a, b in zip(acc["sumsq"], other["sumsq"], strict=True)],
        "min": [pick(a, b, min) for a, b in zip(acc["min"], other["min"], strict=True)],
        "max": [pick(a, b, max) for a, b in zip(acc["max"], other["max"], strict=True)],
        "count": acc["count"] + other["count"],
    }


def finish_stats(sums: dict[str, Any]) -> dict[str, Any]:
    """Sums -> mean/std/min/max/count (population std): a manifest's `stats` entry."""
    n = sums["count"]
    if n == 0:
        return {"mean": [], "std": [], "min": [], "max": [], "count": 0}
    mean = [s / n for s in sums["sum"]]
    std = [math.sqrt(max(sq / n - m * m, 0.0)) for sq, m in zip(sums["sumsq"], mean, strict=True)]
    return {"mean": mean, "std": std, "min": [float(v) for v in sums["min"]], "max": [float(v) for v in sums["max"]], "count": n}
