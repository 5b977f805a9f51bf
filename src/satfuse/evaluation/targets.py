"""Classification targets from DFC2020 / SEN12MS label maps, exactly as the authors derived them.

Why a module of its own: the target definition *is* the benchmark. The authors drop Savanna
and Snow/Ice (too rare / absent in DFC2020) and keep 8 classes; every other pixel value is
the ignore index 255. A crop's single label is its most frequent valid class, its multi-label
target every valid class covering at least `min_fraction` of the crop's *valid* pixels.

Ties in `single_label` go to the lower class index (numpy `argmax` semantics), so the target
is a deterministic function of the map. The target functions take the class count
(`n_classes`, a benchmark's; DFC2020's 8 by default): any benchmark's class-index maps work.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "Forest",
    "Shrubland",
    "Grassland",
    "Wetlands",
    "Croplands",
    "Urban/Built-up",
    "Barren",
    "Water",
)
N_CLASSES = len(CLASS_NAMES)
IGNORE = 255

# IGBP code (0..17, index) -> DFC2020 class (1..10); 0 = no data. From the authors' code.
IGBP2DFC = np.array([0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 6, 8, 9, 10], dtype=np.uint8)

# DFC2020 class (0..10) -> our 8-class index; 0 (no data), 3 (Savanna), 8 (Snow/Ice) -> IGNORE.
_DFC_TO_CLASS = np.full(256, IGNORE, dtype=np.uint8)
for _dfc, _cls in {1: 0, 2: 1, 4: 2, 5: 3, 6: 4, 7: 5, 9: 6, 10: 7}.items():
    _DFC_TO_CLASS[_dfc] = _cls

_IGBP_TO_DFC = np.zeros(256, dtype=np.uint8)
_IGBP_TO_DFC[: len(IGBP2DFC)] = IGBP2DFC


def dfc_to_classes(dfc: np.ndarray) -> np.ndarray:
    """DFC2020 map (values 1..10, any shape) -> 8-class index map with 255 = ignore."""
    return _DFC_TO_CLASS[np.asarray(dfc, dtype=np.uint8)]


def igbp_to_classes(igbp: np.ndarray) -> np.ndarray:
    """SEN12MS IGBP map (values 1..17; `lc.npy` band 0) -> the same 8-class index map."""
    return _DFC_TO_CLASS[_IGBP_TO_DFC[np.asarray(igbp, dtype=np.uint8)]]


def label_map_from_member(name: str, array: np.ndarray) -> np.ndarray:
    """(H, W) class-index map from a shard label member (`dfc.npy` (1,H,W) or `lc.npy` (4,H,W))."""
    if name == "dfc":
        return dfc_to_classes(array[0] if array.ndim == 3 else array)
    if name == "lc":
        return igbp_to_classes(array[0] if array.ndim == 3 else array)
    raise ValueError(f"unknown label member {name!r}; expected 'dfc' or 'lc'")


def class_counts(label_map: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """Pixel count per class (n_classes,), ignoring 255 and anything out of range."""
    flat = np.asarray(label_map).ravel()
    flat = flat[flat < n_classes]
    return np.bincount(flat, minlength=n_classes)[:n_classes]


def single_label(label_map: np.ndarray, n_classes: int = N_CLASSES) -> int | None:
    """Most frequent valid class of the map, or None when no pixel is valid."""
    counts = class_counts(label_map, n_classes)
    if counts.sum() == 0:
        return None
    return int(np.argmax(counts))


def multi_label(label_map: np.ndarray, min_fraction: float = 0.1, n_classes: int = N_CLASSES) -> np.ndarray:
    """n_classes-way multi-hot (uint8): classes covering >= min_fraction of the valid pixels.

    All zeros when no pixel is valid (callers drop or mask such crops).
    """
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    counts = class_counts(label_map, n_classes)
    total = counts.sum()
    if total == 0:
        return np.zeros(n_classes, dtype=np.uint8)
    return (counts / total >= min_fraction - 1e-12).astype(np.uint8)


def batch_targets(label_maps: np.ndarray, min_fraction: float = 0.1,
                  n_classes: int = N_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised targets of a batch of maps (B, H, W).

    Returns (single (B,) int64 with IGNORE where a crop has no valid pixel, multi (B, n_classes) float32).
    """
    b = label_maps.shape[0]
    flat = label_maps.reshape(b, -1).astype(np.int64)
    valid = flat < n_classes
    offsets = np.arange(b, dtype=np.int64)[:, None] * n_classes
    idx = (flat + offsets)[valid]
    counts = np.bincount(idx, minlength=b * n_classes).reshape(b, n_classes)
    total = counts.sum(axis=1)
    single = np.where(total > 0, counts.argmax(axis=1), IGNORE).astype(np.int64)
    frac = counts / np.maximum(total, 1)[:, None]
    multi = ((frac >= min_fraction - 1e-12) & (total[:, None] > 0)).astype(np.float32)
    return single, multi


def vector_targets(fractions: np.ndarray, min_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """`batch_targets` for per-sample class-fraction vectors (B, C): single = argmax (IGNORE
    where a vector is all zeros: no class), multi = fraction >= min_fraction (the SEN12MS
    authors' rule; a multi-hot vector of 0/1 passes through unchanged)."""
    fr = np.asarray(fractions, dtype=np.float32)
    total = fr.sum(axis=1)
    single = np.where(total > 0, fr.argmax(axis=1), IGNORE).astype(np.int64)
    multi = ((fr >= min_fraction - 1e-6) & (total[:, None] > 0)).astype(np.float32)
    return single, multi
