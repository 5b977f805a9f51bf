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


def normalize(x: np.ndarray, stats: BandStats) -> np.ndarray:
    """(C, H, W) raw array -> float32 standardised array; NaN/Inf -> band mean."""
    x = x.astype(np.float32, copy=True)
    mean = np.asarray(stats.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(stats.std, dtype=np.float32)[:, None, None]
    bad = ~np.isfinite(x)
    if bad.any():
        x[bad] = np.broadcast_to(mean, x.shape)[bad]
    np.clip(x, stats.clip[0], stats.clip[1], out=x)
    x -= mean
    x /= std
    return x
