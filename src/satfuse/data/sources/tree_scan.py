"""The scan of a SEN12MS / DFC2020 tree: which files pair into S1/S2 samples, and why the rest is not used.

One job (the layouts themselves are in `layout`): walk the tree once, by names only, pair
each patch's S1 with its S2 (and label), and return every file or folder it did not use
(`ignored`) and every patch it could not pair (`excluded`), each with its reason.
`scan` is what the `sen12ms` and `dfc2020` entries of `satfuse.data.sources.catalog` call.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from satfuse.data.sources.igbp_labels import LABELS_FILE
from satfuse.data.sources.layout import (
    AUX_SENSORS,
    FILE_RE,
    LABEL_SENSOR,
    ROIS,
    SENSORS,
    Dataset,
    Excluded,
    Ignored,
    Pair,
    ScanResult,
    make_key,
    season_of,
)
from satfuse.data.sources.split_lists import read_scene_list, read_split
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)


_DIR_RE = re.compile(r"^(?P<sensor>s1|s2|lc|dfc)_(?P<scene>[0-9]+|validation)$")
_SENSORLIKE_RE = re.compile(r"^(s1|s2|lc|dfc)([_\-. ].*)?$", re.IGNORECASE)
_ROILIKE_RE = re.compile(r"^ROIs[0-9]{4}_", re.IGNORECASE)
_SIDEFILE_RE = re.compile(r"(_observations\.csv|_list\.(txt|pkl)|Scenes\.txt)$", re.IGNORECASE)


def scan(root: Path, dataset: Dataset, split_file: Path | None = None, exclude_scenes: Path | None = None) -> ScanResult:
    """Find every patch of `dataset` under `root` and pair S1 with S2 (and the label).

    Lone files (an S1 without its S2, a label without both images), names that do not follow
    the layout or are ambiguous, and pairs missing their label when the tree has labels are
    excluded with a reason, never silently dropped. With `split_file`, only the listed
    patches are paired; listed patches missing from the tree are excluded (kind `missing`).
    With `exclude_scenes`, the patches of the listed scenes are excluded (kind `held out`).
    """
    root = Path(root)
    _check_root(root, dataset)
    wanted = read_split(split_file, dataset) if split_file is not None else None
    held_out = read_scene_list(exclude_scenes, dataset) if exclude_scenes is not None else set()
    files, excluded, ignored = _collect(root, dataset)
    label_sensor = LABEL_SENSOR[dataset]
    has_labels = any(label_sensor in sensors for sensors in files.values())
    aux = tuple(s for s in AUX_SENSORS[dataset] if any(s in sensors for sensors in files.values()))
    pairs: list[Pair] = []
    not_listed = 0
    for ident in sorted(files):
        if wanted is not None and ident not in wanted:
            not_listed += 1
            continue
        if (ident[0], ident[1]) in held_out:
            key = make_key(*ident)
            excluded.append(Excluded(key, f"held out: scene {ident[0]}/{ident[1]} is listed in {exclude_scenes}", [str(p) for p in files[ident].values()]))
            continue
        item = _pair_or_exclusion(ident, files[ident], label_sensor if has_labels else None, aux)
        (pairs if isinstance(item, Pair) else excluded).append(item)  # type: ignore[arg-type]
    missing: list[str] = []
    if wanted is not None:
        for roi, scene, patch in sorted(wanted - set(files)):
            key = make_key(roi, scene, patch)
            missing.append(key)
            reason = f"missing: listed in {split_file} but no file of it exists under {root}"
            excluded.append(Excluded(key, reason, []))
    excluded.sort(key=lambda e: (e.key, e.reason))
    given = {os.path.abspath(p) for p in (split_file, exclude_scenes) if p is not None}
    ignored = sorted((i for i in ignored if os.path.abspath(root / i.path) not in given), key=lambda i: i.path)
    label = label_sensor if has_labels else None
    return ScanResult(pairs=pairs, excluded=excluded, label=label, ignored=ignored, aux=aux, missing=missing, not_listed=not_listed)


def _check_root(root: Path, dataset: str) -> None:
    if dataset not in ROIS:
        raise SatfuseError(f"unknown dataset {dataset!r}: not a SEN12MS-style tree; use one of {list(ROIS)}")
    if not root.is_dir():
        raise SatfuseError(f"{root}: source directory does not exist; pass the dataset root (holding {ROIS[dataset][0]}/ ...)")
    if not any(root.iterdir()):
        raise SatfuseError(f"{root}: source directory is empty; download the data or run `satfuse synth {dataset} --out {root}`")


def _kind(entry: os.DirEntry) -> str:
    """'dir', 'file', 'loop' (a symlink that points back into itself), 'broken' or 'other'."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError as exc:  # ELOOP: `s1_7 -> s1_7`
        return "loop" if exc.errno == errno.ELOOP else "broken"
    if entry.is_symlink():
        return "broken"
    return "other"


def _listdir(path: str) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        raise SatfuseError(f"{path}: cannot list this folder ({exc.strerror or exc}); fix its permissions or remove it") from None


def _unusable(entry: os.DirEntry, rel: str, kind: str) -> Ignored:
    if kind == "loop":
        log.warning("%s: symlink loop (%s -> %s); it is skipped: fix or remove the link", entry.path, entry.name, os.readlink(entry.path))
        return Ignored(rel, "symlink loop: the link points back into itself; fix or remove it")
    log.warning("%s: broken symlink or unreadable entry; it is skipped: fix or remove it", entry.path)
    return Ignored(rel, "broken: a dangling symlink or an entry that cannot be read; fix or remove it")


def _entries(path: str, prefix: str, ignored: list[Ignored]) -> Iterator[tuple[os.DirEntry, str, str]]:
    """(entry, path relative to the root, kind) of a folder's usable entries, sorted by name;
    symlink loops and broken entries are recorded in `ignored` (with a warning) instead."""
    for entry in _listdir(path):
        rel = f"{prefix}{entry.name}"
        kind = _kind(entry)
        if kind in ("loop", "broken"):
            ignored.append(_unusable(entry, rel, kind))
            continue
        yield entry, rel, kind


def _collect(root: Path, dataset: str) -> tuple[dict[tuple[str, int, int], dict[str, Path]], list[Excluded], list[Ignored]]:
    """Walk the ROI/sensor_scene dirs with scandir; group files by (roi, scene, patch)."""
    excluded: list[Excluded] = []
    ignored: list[Ignored] = []
    # (roi, sensor, scene) -> folder entries naming it (two = ambiguous: s1_01 beside s1_1)
    folders: dict[tuple[str, str, int], list[os.DirEntry]] = defaultdict(list)
    for top in _listdir(str(root)):
        kind = _kind(top)
        if kind in ("loop", "broken"):
            ignored.append(_unusable(top, top.name, kind))
        elif kind == "dir" and top.name in ROIS[dataset]:
            _collect_roi(top, dataset, folders, ignored)
        elif kind == "file" and _SIDEFILE_RE.search(top.name):
            ignored.append(Ignored(top.name, "side file: a split or scene list, read only when passed as --split-file / --exclude-scenes"))
        elif kind == "dir" and top.name == LABELS_FILE.split("/")[0] and dataset == "sen12ms":
            ignored.append(Ignored(top.name, f"side folder: {LABELS_FILE}, read only when passed as --labels"))
        elif kind == "dir" and _ROILIKE_RE.match(top.name):
            log.warning("%s: looks like a ROI folder but is not one of %s's (%s); it is skipped", top.path, dataset, ", ".join(ROIS[dataset]))
            ignored.append(Ignored(top.name, f"not a {dataset} ROI folder (expected {', '.join(ROIS[dataset])}); wrong --dataset?"))
        else:
            what = "folder" if kind == "dir" else "file"
            ignored.append(Ignored(top.name, f"not part of the {dataset} layout: a {what} beside the ROI folders"))
    files: dict[tuple[str, int, int], dict[str, Path]] = defaultdict(dict)
    names: dict[tuple[str, str, int, int], list[Path]] = defaultdict(list)
    for (roi, sensor, scene), entries in sorted(folders.items()):
        if len(entries) > 1:
            dirs = " and ".join(e.name for e in entries)
            for e in entries:
                for f in _listdir(e.path):
                    reason = f"ambiguous: folders {dirs} both name scene {scene} of {sensor}; rename or remove all but one"
                    excluded.append(Excluded(f"{roi}/{e.name}/{f.name}", reason, [f.path]))
            continue
        _collect_files(root, entries[0], roi, sensor, scene, names, excluded, ignored)
    for (roi, sensor, scene, patch), paths in names.items():
        if len(paths) > 1:
            listed = " and ".join(p.name for p in paths)
            for p in paths:
                reason = f"ambiguous: {listed} both name patch {patch} of {sensor}; rename or remove all but one"
                excluded.append(Excluded(f"{roi}/{p.parent.name}/{p.name}", reason, [str(p)]))
            continue
        files[(roi, scene, patch)][sensor] = paths[0]
    if not files and not excluded:
        raise SatfuseError(f"{root}: no {dataset} patches found (expected {ROIS[dataset][0]}/s1_<scene>/*.tif ...); check --src and --dataset")
    return files, excluded, ignored


def _collect_roi(roi_entry: os.DirEntry, dataset: str, folders: dict, ignored: list[Ignored]) -> None:
    roi = roi_entry.name
    for sub, rel, kind in _entries(roi_entry.path, f"{roi}/", ignored):
        m = _DIR_RE.match(sub.name)
        if kind == "dir" and m and m["sensor"] in SENSORS[dataset]:
            if m["scene"] == "validation":
                if roi != "ROIs0000_validation":
                    ignored.append(Ignored(rel, f"not a sensor folder of {roi}: `_validation` folders belong to ROIs0000_validation"))
                    log.warning("%s: `_validation` sensor folder outside ROIs0000_validation; it is skipped", sub.path)
                    continue
                folders[(roi, m["sensor"], 0)].append(sub)
            else:
                folders[(roi, m["sensor"], int(m["scene"]))].append(sub)
        elif kind == "dir" and _SENSORLIKE_RE.match(sub.name):
            known = ", ".join(f"{s}_<scene>" for s in SENSORS[dataset])
            log.warning("%s: looks like a sensor folder but is not one of %s's (%s); its files are skipped", sub.path, dataset, known)
            ignored.append(Ignored(rel, f"unknown sensor folder: not one of {dataset}'s ({known}); rename it or move it out of --src"))
        else:
            what = "folder" if kind == "dir" else "file"
            ignored.append(Ignored(rel, f"not part of the {dataset} layout: a {what} beside the sensor folders"))


def _collect_files(root: Path, folder: os.DirEntry, roi: str, sensor: str, scene: int, names: dict, excluded: list[Excluded], ignored: list[Ignored]) -> None:
    for entry, rel, kind in _entries(folder.path, f"{roi}/{folder.name}/", ignored):
        if kind == "dir" or not entry.name.endswith(".tif"):  # a FIFO or device is read (and fails) like a file
            what = "a folder" if kind == "dir" else "not a .tif"
            ignored.append(Ignored(rel, f"not a patch: {what} inside a sensor folder"))
            continue
        fm = FILE_RE.match(entry.name)
        path = Path(entry.path)
        if not fm or fm["roi"] != roi or fm["sensor"] != sensor or int(fm["scene"]) != scene:
            want = f"{roi}_{sensor}_{scene}_p<ID>.tif (ID in ASCII digits)"
            excluded.append(Excluded(rel, f"unrecognised name: does not follow the layout {want}; rename or remove it", [str(path)]))
            continue
        names[(roi, sensor, scene, int(fm["patch"]))].append(path)


def _pair_or_exclusion(ident: tuple[str, int, int], sensors: dict[str, Path], label_sensor: str | None, aux: tuple[str, ...] = ()) -> Pair | Excluded:
    roi, scene, patch = ident
    key = make_key(roi, scene, patch)
    paths = [str(sensors[s]) for s in sorted(sensors)]
    needed = ["s1", "s2"] + ([label_sensor] if label_sensor else []) + list(aux)
    missing = [s for s in needed if s not in sensors]
    if missing:
        reason = f"lone file(s): {', '.join(sorted(sensors))} present but {', '.join(missing)} missing; add the missing file(s) or remove the rest"
        return Excluded(key, reason, paths)
    label = sensors.get(label_sensor) if label_sensor else None
    return Pair(key, roi, season_of(roi), scene, patch, sensors["s1"], sensors["s2"], label, tuple((s, sensors[s]) for s in aux))
