"""The on-disk layout of SEN12MS and DFC2020, and the scan that pairs S1 with S2 patches.

Why a layout module of its own: the synthetic generator writes exactly this layout and the
sharding tool reads exactly this layout, so the same reader works on the real downloads.

    {root}/{roi}/{sensor}_{scene}/{roi}_{sensor}_{scene}_p{patch}.tif

SEN12MS: roi in ROIs1158_spring, ROIs1868_summer, ROIs1970_fall, ROIs2017_winter; sensor in
s1, s2, lc. DFC2020: roi in ROIs0000_validation, ROIs0000_test (scene 0); sensor in s1, s2, dfc.

The scan only looks at names (opening 500k files twice would halve the packing speed); the
co-location checks (CRS, transform, shape) happen while the packer reads the pixels.

Split lists `{root}/{split}_observations.csv` have the columns Season, Scene, ID. SEN12MS
writes the season as `Seasons.SPRING` (as the real lists do); our DFC2020 convention is the
split name in the same style, `Seasons.VALIDATION` / `Seasons.TEST`, with Scene 0. A plain
season (`spring`) or a full ROI name (`ROIs1158_spring`) is accepted too.
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from satfuse.utils import SatfuseError

Dataset = Literal["sen12ms", "dfc2020"]

SEN12MS_ROIS = ("ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter")
DFC2020_ROIS = ("ROIs0000_validation", "ROIs0000_test")
ROIS: dict[str, tuple[str, ...]] = {"sen12ms": SEN12MS_ROIS, "dfc2020": DFC2020_ROIS}
LABEL_SENSOR: dict[str, str] = {"sen12ms": "lc", "dfc2020": "dfc"}

# Expected raster contents per sensor: (band count, numpy dtype name).
EXPECTED_BANDS: dict[str, tuple[int, str]] = {
    "s1": (2, "float32"),
    "s2": (13, "uint16"),
    "lc": (4, "uint8"),
    "dfc": (1, "uint8"),
}

# IGBP code (index 0..17) -> DFC2020 class 1..10 (method.md; 0 = no data).
IGBP2DFC = (0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 6, 8, 9, 10)
DFC_CLASSES = (
    "Forest", "Shrubland", "Savanna", "Grassland", "Wetlands",
    "Croplands", "Urban/Built-up", "Snow/Ice", "Barren", "Water",
)  # fmt: skip

_FILE_RE = re.compile(r"^(?P<roi>ROIs\d{4}_[a-z]+)_(?P<sensor>s1|s2|lc|dfc)_(?P<scene>\d+)_p(?P<patch>\d+)\.tif$")
_DIR_RE = re.compile(r"^(?P<sensor>s1|s2|lc|dfc)_(?P<scene>\d+)$")


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


@dataclass(frozen=True)
class Excluded:
    """A patch that is not packed, with the reason a user can act on."""

    key: str
    reason: str
    paths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason, "paths": list(self.paths)}


@dataclass
class ScanResult:
    """What `scan` found: pairs sorted by (roi, scene, patch), and the exclusions."""

    pairs: list[Pair]
    excluded: list[Excluded]
    label: str | None  # "lc" / "dfc" when the tree holds labels, else None


def season_of(roi: str) -> str:
    """`ROIs1158_spring` -> `spring`; `ROIs0000_validation` -> `validation` (the split)."""
    return roi.split("_", 1)[1]


def make_key(roi: str, scene: int, patch: int) -> str:
    """The sample key of the shard format: `{roi}_{scene}_p{patch}` (no dots)."""
    return f"{roi}_{scene}_p{patch}"


def patch_path(root: Path, roi: str, sensor: str, scene: int, patch: int) -> Path:
    """Where a patch file lives in the real layout."""
    return root / roi / f"{sensor}_{scene}" / f"{roi}_{sensor}_{scene}_p{patch}.tif"


def scan(root: Path, dataset: Dataset, split_file: Path | None = None) -> ScanResult:
    """Find every patch of `dataset` under `root` and pair S1 with S2 (and the label).

    Lone files (an S1 without its S2, a label without both images), names that do not follow
    the layout, and pairs missing their label when the tree has labels are excluded with a
    reason, never silently dropped. With `split_file`, only the listed patches are paired;
    listed patches missing from the tree are excluded too.
    """
    root = Path(root)
    _check_root(root, dataset)
    files, excluded = _collect(root, dataset)
    label_sensor = LABEL_SENSOR[dataset]
    has_labels = any(label_sensor in sensors for sensors in files.values())
    wanted = read_split(split_file, dataset) if split_file is not None else None
    pairs: list[Pair] = []
    for ident in sorted(files):
        if wanted is not None and ident not in wanted:
            continue
        item = _pair_or_exclusion(ident, files[ident], label_sensor if has_labels else None)
        if isinstance(item, Pair):
            pairs.append(item)
        else:
            excluded.append(item)
    if wanted is not None:
        for roi, scene, patch in sorted(wanted - set(files)):
            key = make_key(roi, scene, patch)
            reason = f"missing: listed in {split_file} but no file of it exists under {root}"
            excluded.append(Excluded(key, reason, []))
    excluded.sort(key=lambda e: (e.key, e.reason))
    return ScanResult(pairs=pairs, excluded=excluded, label=label_sensor if has_labels else None)


def _check_root(root: Path, dataset: str) -> None:
    if dataset not in ROIS:
        raise SatfuseError(f"unknown dataset {dataset!r}; use one of {sorted(ROIS)}")
    if not root.is_dir():
        raise SatfuseError(f"{root}: source directory does not exist; pass the dataset root (holding {ROIS[dataset][0]}/ ...)")
    if not any(root.iterdir()):
        raise SatfuseError(f"{root}: source directory is empty; download the data or run `satfuse synth {dataset} --out {root}`")


def _collect(root: Path, dataset: str) -> tuple[dict[tuple[str, int, int], dict[str, Path]], list[Excluded]]:
    """Walk the ROI/sensor_scene dirs with scandir; group files by (roi, scene, patch)."""
    files: dict[tuple[str, int, int], dict[str, Path]] = defaultdict(dict)
    excluded: list[Excluded] = []
    sensors_ok = {"s1", "s2", LABEL_SENSOR[dataset]}
    for roi in ROIS[dataset]:
        roi_dir = root / roi
        if not roi_dir.is_dir():
            continue
        for sub in sorted(os.scandir(roi_dir), key=lambda e: e.name):
            m = _DIR_RE.match(sub.name)
            if not sub.is_dir() or not m or m["sensor"] not in sensors_ok:
                continue
            for entry in sorted(os.scandir(sub.path), key=lambda e: e.name):
                if not entry.name.endswith(".tif"):
                    continue
                fm = _FILE_RE.match(entry.name)
                path = Path(entry.path)
                if not fm or fm["roi"] != roi or fm["sensor"] != m["sensor"] or fm["scene"] != m["scene"]:
                    excluded.append(Excluded(f"{roi}/{sub.name}/{entry.name}", f"unrecognised name: does not follow the layout {roi}_{m['sensor']}_{m['scene']}_p<ID>.tif; rename or remove it", [str(path)]))
                    continue
                files[(roi, int(fm["scene"]), int(fm["patch"]))][fm["sensor"]] = path
    if not files and not excluded:
        raise SatfuseError(f"{root}: no {dataset} patches found (expected {ROIS[dataset][0]}/s1_<scene>/*.tif ...); check --src and --dataset")
    return files, excluded


def _pair_or_exclusion(ident: tuple[str, int, int], sensors: dict[str, Path], label_sensor: str | None) -> Pair | Excluded:
    roi, scene, patch = ident
    key = make_key(roi, scene, patch)
    paths = [str(sensors[s]) for s in sorted(sensors)]
    missing = [s for s in ("s1", "s2") if s not in sensors]
    if label_sensor and label_sensor not in sensors:
        missing.append(label_sensor)
    if missing:
        reason = f"lone file(s): {', '.join(sorted(sensors))} present but {', '.join(missing)} missing; add the missing file(s) or remove the rest"
        return Excluded(key, reason, paths)
    label = sensors.get(label_sensor) if label_sensor else None
    return Pair(key, roi, season_of(roi), scene, patch, sensors["s1"], sensors["s2"], label)


def read_split(split_file: Path, dataset: str) -> set[tuple[str, int, int]]:
    """Read a `{split}_observations.csv` (Season, Scene, ID) into (roi, scene, patch) ids."""
    split_file = Path(split_file)
    if not split_file.is_file():
        raise SatfuseError(f"{split_file}: split file not found; pass an existing *_observations.csv")
    by_season = {season_of(r): r for r in ROIS[dataset]}
    out: set[tuple[str, int, int]] = set()
    with open(split_file, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"Season", "Scene", "ID"} <= set(reader.fieldnames):
            raise SatfuseError(f"{split_file}: needs the columns Season,Scene,ID (got {reader.fieldnames}); fix the header")
        for lineno, row in enumerate(reader, start=2):
            out.add(_split_row(row, by_season, split_file, lineno))
    return out


def _split_row(row: dict[str, str], by_season: dict[str, str], split_file: Path, lineno: int) -> tuple[str, int, int]:
    text = row["Season"].strip()
    season = text.split(".", 1)[1].lower() if text.startswith("Seasons.") else text
    roi = by_season.get(season, season if season in by_season.values() else None)
    if roi is None:
        raise SatfuseError(f"{split_file}:{lineno}: unknown Season {text!r}; use one of {[f'Seasons.{s.upper()}' for s in by_season]}")
    try:
        return roi, int(row["Scene"]), int(row["ID"])
    except (TypeError, ValueError):
        raise SatfuseError(f"{split_file}:{lineno}: Scene and ID must be integers, got {row['Scene']!r}, {row['ID']!r}") from None


def write_split(path: Path, ids: list[tuple[str, int, int]]) -> None:
    """Write a split list in the real format (Season as `Seasons.SPRING`), atomically."""
    from satfuse.utils import atomic_write_text

    lines = ["Season,Scene,ID"]
    lines += [f"Seasons.{season_of(roi).upper()},{scene},{patch}" for roi, scene, patch in ids]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
