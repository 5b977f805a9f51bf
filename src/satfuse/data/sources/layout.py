"""The on-disk layouts satfuse reads (SEN12MS, DFC2020, a user's pair list), and the scan
that pairs S1 with S2 patches.

Why a layout module of its own: the synthetic generator writes exactly these layouts and the
sharding tool reads exactly these layouts, so the same reader works on the real downloads.

SEN12MS (as published):

    {root}/{roi}/{sensor}_{scene}/{roi}_{sensor}_{scene}_p{patch}.tif

roi in ROIs1158_spring, ROIs1868_summer, ROIs1970_fall, ROIs2017_winter; sensor in s1, s2, lc.

DFC2020 (the download): roi in ROIs0000_validation, ROIs0000_test, scene 0, sensors s1, s2,
dfc and (when present) lc. The validation folders are named `{sensor}_validation` in the
download and `{sensor}_0` after the renaming some loaders need; both are read. File names
always carry scene 0: `ROIs0000_validation/s1_validation/ROIs0000_validation_s1_0_p7.tif`.

Pairs (`--dataset pairs`): a CSV with the columns s1, s2 and optionally label, paths
relative to the root; any co-located S1/S2 GeoTIFFs.

The scan only looks at names (opening 500k files twice would halve the packing speed); the
co-location and content checks happen while the packer reads the pixels. Nothing under the
root is skipped without a word: what the scan does not use is returned as `ignored` with a
reason, and names that are ambiguous (`_p03` beside `_p3`) or not ASCII digits are excluded.

This module holds the names and rules of those layouts; the tree scan is `tree_scan`, the
published split lists `split_lists`, a user's pair list `pairs_file`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Dataset = str

SEN12MS_ROIS = ("ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter")
DFC2020_ROIS = ("ROIs0000_validation", "ROIs0000_test")
ROIS: dict[str, tuple[str, ...]] = {"sen12ms": SEN12MS_ROIS, "dfc2020": DFC2020_ROIS}
LABEL_SENSOR: dict[str, str] = {"sen12ms": "lc", "dfc2020": "dfc", "pairs": "label"}
# Layers packed beside the label when a tree has them (DFC2020 ships the MODIS lc layers too).
AUX_SENSORS: dict[str, tuple[str, ...]] = {"sen12ms": (), "dfc2020": ("lc",), "pairs": ()}
SENSORS: dict[str, tuple[str, ...]] = {"sen12ms": ("s1", "s2", "lc"), "dfc2020": ("s1", "s2", "lc", "dfc")}

# Shard member contents per sensor: (band count, numpy dtype name). `satfuse shard verify` checks these.
EXPECTED_BANDS: dict[str, tuple[int, str]] = {
    "s1": (2, "float32"),
    "s2": (13, "uint16"),
    "lc": (4, "uint8"),
    "dfc": (1, "uint8"),
    "label": (1, "uint8"),
}


@dataclass(frozen=True)
class SourceRule:
    """What a source GeoTIFF of a sensor may hold; it is converted to EXPECTED_BANDS' dtype.

    Why rules and not one dtype: the publishers and the tools around them disagree (SEN12MS
    is documented as 16-bit, torchgeo's fixture writes lc as uint16, some tools write S2 as
    int16). What matters is the band count, an integer type for labels, and values that fit.
    """

    bands: int
    dtypes: tuple[str, ...]
    max_values: tuple[int, ...] | None = None  # per band, integer rasters; values must be in [0, max]


_INTS = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64")
SOURCE_RULES: dict[str, SourceRule] = {
    "s1": SourceRule(2, ("float32",)),
    "s2": SourceRule(13, ("uint16", "int16"), (65535,) * 13),
    "lc": SourceRule(4, _INTS, (17, 255, 255, 255)),  # IGBP 0..17 (0 = no data), LCCS codes
    "dfc": SourceRule(1, _INTS, (10,)),  # DFC2020 classes 1..10 (0 = no data)
    "label": SourceRule(1, _INTS, (255,)),  # a user's class map
}

# S1 backscatter a dB source may hold. Sentinel-1 GRD sigma0 spans about -50 dB (noise floor,
# scene borders) to +30 dB (corner reflectors); published samples: SSL4EO-S12 -35.7..+4.2,
# BigEarthNet -29.8..+4.4. The bound is wide on purpose: it catches values that are not dB at
# all (digital numbers: torchgeo's SEN12MS fixture holds up to 65,533), not unusual backscatter.
S1_DB_RANGE = (-100.0, 60.0)


def s1_range_problem(array: object, where: str) -> str | None:
    """`out of range: ...` when finite S1 values leave S1_DB_RANGE, else None (NaN is checked apart)."""
    lo, hi = float(np.min(array)), float(np.max(array))
    if lo >= S1_DB_RANGE[0] and hi <= S1_DB_RANGE[1]:
        return None
    return (f"out of range: {where} holds S1 values {lo:g}..{hi:g}, backscatter in dB lies within {S1_DB_RANGE[0]:g}.."
            f"{S1_DB_RANGE[1]:g} (is it linear power or digital numbers?); fix the file or remove the pair")


# IGBP code (index 0..17) -> DFC2020 class 1..10 (method.md; 0 = no data).
IGBP2DFC = (0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 6, 8, 9, 10)
DFC_CLASSES = (
    "Forest", "Shrubland", "Savanna", "Grassland", "Wetlands",
    "Croplands", "Urban/Built-up", "Snow/Ice", "Barren", "Water",
)  # fmt: skip

# Season tokens of the split CSVs -> ROI folder. VALSET/TESTSET are the seed paper's tokens.
SEASON_TOKENS: dict[str, str] = {
    "SPRING": "ROIs1158_spring", "SUMMER": "ROIs1868_summer", "FALL": "ROIs1970_fall",
    "WINTER": "ROIs2017_winter", "VALSET": "ROIs0000_validation", "TESTSET": "ROIs0000_test",
    "VALIDATION": "ROIs0000_validation", "TEST": "ROIs0000_test",
}  # fmt: skip
ROI_TOKEN = {"ROIs1158_spring": "SPRING", "ROIs1868_summer": "SUMMER", "ROIs1970_fall": "FALL",
             "ROIs2017_winter": "WINTER", "ROIs0000_validation": "VALSET", "ROIs0000_test": "TESTSET"}  # fmt: skip

# ASCII digits only: Python's \d also matches '١' (Arabic-Indic one), which int() reads as 1.
FILE_RE = re.compile(r"^(?P<roi>ROIs[0-9]{4}_[a-z]+)_(?P<sensor>s1|s2|lc|dfc)_(?P<scene>[0-9]+)_p(?P<patch>[0-9]+)\.tif$")
MAX_SHOWN = 5


@dataclass(frozen=True)
class Pair:
    """One co-located S1/S2 patch (and its label file when the dataset has labels)."""

    key: str
    roi: str
    season: str
    scene: int
    patch: int
    s1: Path
    s2: Path
    label: Path | None = None
    aux: tuple[tuple[str, Path], ...] = ()  # further layers packed with the pair, e.g. DFC2020's lc


@dataclass(frozen=True)
class Excluded:
    """A patch that is not packed, with the reason a user can act on."""

    key: str
    reason: str
    paths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason, "paths": list(self.paths)}


@dataclass(frozen=True)
class Ignored:
    """A file or folder under the root that the scan does not use, and why."""

    path: str  # relative to the root
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


@dataclass
class ScanResult:
    """What a scan found: pairs sorted by (roi, scene, patch), the exclusions, the ignored."""

    pairs: list[Pair]
    excluded: list[Excluded]
    label: str | None  # "lc" / "dfc" / "label" when the tree holds labels, else None
    ignored: list[Ignored] = field(default_factory=list)
    aux: tuple[str, ...] = ()  # extra layers every pair carries (DFC2020 lc when present)
    missing: list[str] = field(default_factory=list)  # split-list entries without files
    not_listed: int = 0  # complete-or-not patches on disk that the split list leaves out


def season_of(roi: str) -> str:
    """`ROIs1158_spring` -> `spring`; `ROIs0000_validation` -> `validation` (the split)."""
    return roi.split("_", 1)[1]


def make_key(roi: str, scene: int, patch: int) -> str:
    """The sample key of the shard format: `{roi}_{scene}_p{patch}` (no dots)."""
    return f"{roi}_{scene}_p{patch}"


def sensor_dir(roi: str, sensor: str, scene: int, validation_folders: str = "validation") -> str:
    """The folder of a sensor: `s1_26`; DFC2020 validation `s1_validation` (download) or `s1_0`."""
    if roi == "ROIs0000_validation" and validation_folders == "validation":
        return f"{sensor}_validation"
    return f"{sensor}_{scene}"


def patch_path(root: Path, roi: str, sensor: str, scene: int, patch: int, validation_folders: str = "validation") -> Path:
    """Where a patch file lives in the published layout."""
    return root / roi / sensor_dir(roi, sensor, scene, validation_folders) / f"{roi}_{sensor}_{scene}_p{patch}.tif"

