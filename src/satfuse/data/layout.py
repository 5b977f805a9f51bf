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

Split lists (`--split-file`), all as published:
- the seed paper's `{sen12ms,validation,test}_observations.csv`: `Seasons.X,scene,id`, no
  header (a `Season,Scene,ID` header is accepted too), X in SPRING SUMMER FALL WINTER
  (SEN12MS) or VALSET TESTSET (DFC2020; VALIDATION / TEST also read); LF or CRLF; a UTF-8 BOM;
- SEN12MS's `{train,test}_list.txt`: one file name per line (S2 names), CRLF;
- SEN12MS's `{train,test}_list.pkl`: a pickled list of those names, read by an unpickler
  that refuses every global, so a hostile pickle cannot run code;
- scene lists such as `SEN12MS_holdOutScenes.txt` (`ROIs1158_spring/s1_63`) are for
  `--exclude-scenes`.
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import pickle
import pickletools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

Dataset = str

SEN12MS_ROIS = ("ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter")
DFC2020_ROIS = ("ROIs0000_validation", "ROIs0000_test")
ROIS: dict[str, tuple[str, ...]] = {"sen12ms": SEN12MS_ROIS, "dfc2020": DFC2020_ROIS}
LABEL_SENSOR: dict[str, str] = {"sen12ms": "lc", "dfc2020": "dfc", "pairs": "label"}
# Layers packed beside the label when a tree has them (DFC2020 ships the MODIS lc layers too).
AUX_SENSORS: dict[str, tuple[str, ...]] = {"sen12ms": (), "dfc2020": ("lc",), "pairs": ()}
SENSORS: dict[str, tuple[str, ...]] = {"sen12ms": ("s1", "s2", "lc"), "dfc2020": ("s1", "s2", "lc", "dfc")}
# The datasets `satfuse shard --dataset` knows; new layouts add their name and a branch in `scan_dataset`.
DATASETS: tuple[str, ...] = ("sen12ms", "dfc2020", "pairs")

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
_FILE_RE = re.compile(r"^(?P<roi>ROIs[0-9]{4}_[a-z]+)_(?P<sensor>s1|s2|lc|dfc)_(?P<scene>[0-9]+)_p(?P<patch>[0-9]+)\.tif$")
_DIR_RE = re.compile(r"^(?P<sensor>s1|s2|lc|dfc)_(?P<scene>[0-9]+|validation)$")
_SENSORLIKE_RE = re.compile(r"^(s1|s2|lc|dfc)([_\-. ].*)?$", re.IGNORECASE)
_ROILIKE_RE = re.compile(r"^ROIs[0-9]{4}_", re.IGNORECASE)
_SCENE_LINE_RE = re.compile(r"^(?P<roi>ROIs[0-9]{4}_[a-z]+)/(?P<sensor>s1|s2|lc|dfc)_(?P<scene>[0-9]+)$")
_SIDE_FILE_RE = re.compile(r"(_observations\.csv|_list\.(txt|pkl)|Scenes\.txt)$", re.IGNORECASE)
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


def scan_dataset(
    root: Path,
    dataset: Dataset,
    split_file: Path | None = None,
    exclude_scenes: Path | None = None,
    pairs_file: Path | None = None,
) -> ScanResult:
    """Dispatch to the scan of a dataset's layout (the one entry point of `satfuse shard`)."""
    if dataset == "pairs":
        if pairs_file is None:
            raise SatfuseError("--dataset pairs needs --pairs-file FILE.csv (columns s1,s2[,label], paths relative to --src)")
        if split_file is not None or exclude_scenes is not None:
            raise SatfuseError("--dataset pairs takes its pairs from --pairs-file; drop --split-file / --exclude-scenes")
        return scan_pairs(root, pairs_file)
    if pairs_file is not None:
        raise SatfuseError(f"--pairs-file is for --dataset pairs, not {dataset}")
    return scan(root, dataset, split_file, exclude_scenes)


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
        raise SatfuseError(f"unknown dataset {dataset!r}; use one of {list(DATASETS)}")
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
        elif kind == "file" and _SIDE_FILE_RE.search(top.name):
            ignored.append(Ignored(top.name, "side file: a split or scene list, read only when passed as --split-file / --exclude-scenes"))
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
    for sub in _listdir(roi_entry.path):
        rel = f"{roi}/{sub.name}"
        kind = _kind(sub)
        if kind in ("loop", "broken"):
            ignored.append(_unusable(sub, rel, kind))
            continue
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
    for entry in _listdir(folder.path):
        rel = f"{roi}/{folder.name}/{entry.name}"
        kind = _kind(entry)
        if kind in ("loop", "broken"):
            ignored.append(_unusable(entry, rel, kind))
            continue
        if kind == "dir" or not entry.name.endswith(".tif"):  # a FIFO or device is read (and fails) like a file
            what = "a folder" if kind == "dir" else "not a .tif"
            ignored.append(Ignored(rel, f"not a patch: {what} inside a sensor folder"))
            continue
        fm = _FILE_RE.match(entry.name)
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


# --------------------------------------------------------------------------------------------
# Split lists and scene lists
# --------------------------------------------------------------------------------------------


class _NoGlobals(pickle.Unpickler):
    """Unpickles plain data only: every class or function lookup is refused, so a pickle
    cannot construct objects or call anything (os.system, eval, ...)."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"refers to {module}.{name}")


# The opcodes a pickled list of str is made of (any protocol); everything else is refused
# before unpickling, so no class is looked up and no claimed length is allocated unchecked.
_LIST_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
})  # fmt: skip
MAX_PICKLE_BYTES = 256 << 20  # the full SEN12MS list is ~6 MB


def read_pickle_list(path: Path) -> list[str]:
    """A pickled `list[str]` (SEN12MS's *_list.pkl); anything else is refused naming the file.

    Two gates: the opcode stream is walked without executing it (pickletools) and must hold
    only list/str opcodes; then an unpickler that refuses every global loads it.
    """
    path = Path(path)
    if path.stat().st_size > MAX_PICKLE_BYTES:
        raise SatfuseError(f"{path}: refused: {path.stat().st_size} bytes is far more than a list of file names; pass the *_list.txt instead")
    blob = path.read_bytes()
    try:
        for op, _, pos in pickletools.genops(blob):
            if op.name not in _LIST_OPCODES:
                raise pickle.UnpicklingError(f"opcode {op.name} at byte {pos}")
        data = _NoGlobals(io.BytesIO(blob)).load()
    except Exception as exc:  # any failure of the gates: not a plain list (fuzzed: also Overflow/MemoryError)
        raise SatfuseError(f"{path}: refused: not a plain pickled list of file names ({exc}); satfuse never runs code from a pickle, pass the *_list.txt instead") from None
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise SatfuseError(f"{path}: refused: the pickle holds a {type(data).__name__}, not a list of file names; pass the *_list.txt instead")
    return data


def _text_lines(path: Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SatfuseError(f"{path}: {what} not found; pass an existing file")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM (Excel's CSVs) is not part of the first field
    except UnicodeDecodeError as exc:
        raise SatfuseError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    return text.splitlines()  # LF and CRLF alike


def read_split(split_file: Path, dataset: str) -> set[tuple[str, int, int]]:
    """Read a split list in any published format (module doc) into (roi, scene, patch) ids."""
    split_file = Path(split_file)
    if split_file.suffix.lower() == ".pkl":
        if not split_file.is_file():
            raise SatfuseError(f"{split_file}: split file not found; pass an existing *_list.pkl")
        ids = [_name_id(name, dataset, split_file, i + 1) for i, name in enumerate(read_pickle_list(split_file))]
        return _nonempty(set(ids), split_file)
    lines = _text_lines(split_file, "split file")
    content = [(i + 1, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if not content:
        raise SatfuseError(f"{split_file}: the list is empty; pass a split list with at least one patch")
    first = content[0][1]
    if _SCENE_LINE_RE.match(first):
        raise SatfuseError(f"{split_file}: a scene list (`{first}`), not a patch list; pass it as --exclude-scenes {split_file}")
    if "," in first:
        return _nonempty(_read_csv(split_file, content, dataset), split_file)
    return _nonempty({_name_id(line, dataset, split_file, n) for n, line in content}, split_file)


def _nonempty(ids: set[tuple[str, int, int]], path: Path) -> set[tuple[str, int, int]]:
    if not ids:
        raise SatfuseError(f"{path}: the list is empty (a header and no rows); pass a split list with at least one patch")
    return ids


def _read_csv(split_file: Path, content: list[tuple[int, str]], dataset: str) -> set[tuple[str, int, int]]:
    rows = list(csv.reader([line for _, line in content]))
    header = [c.strip().lower() for c in rows[0]]
    cols = (0, 1, 2)
    if header and header[0] in ("season", "seasons"):
        try:
            cols = (header.index(header[0]), header.index("scene"), header.index("id"))
        except ValueError:
            raise SatfuseError(f"{split_file}: header {rows[0]} needs the columns Season,Scene,ID (or no header: Seasons.X,scene,id rows)") from None
        rows, content = rows[1:], content[1:]
    out: set[tuple[str, int, int]] = set()
    for (lineno, _), row in zip(content, rows, strict=True):
        if len(row) <= max(cols):
            raise SatfuseError(f"{split_file}:{lineno}: {len(row)} column(s), need Season,Scene,ID (e.g. Seasons.SPRING,26,475)")
        out.add(_split_row(row[cols[0]], row[cols[1]], row[cols[2]], dataset, split_file, lineno))
    return out


def _roi_of_token(text: str, dataset: str, where: str) -> str:
    token = text.strip()
    name = token.split(".", 1)[1] if token.startswith("Seasons.") else token
    roi = SEASON_TOKENS.get(name.upper())
    if roi is None and name in SEASON_TOKENS.values():
        roi = name
    if roi is None:
        valid = [f"Seasons.{ROI_TOKEN[r]}" for r in ROIS[dataset]]
        raise SatfuseError(f"{where}: unknown Season {token!r}; use one of {valid}")
    if roi not in ROIS[dataset]:
        other = next(d for d, rois in ROIS.items() if roi in rois)
        raise SatfuseError(f"{where}: Season {token!r} is a {other} token, but --dataset is {dataset}; pass --dataset {other} or the right split list")
    return roi


def _split_row(season: str, scene: str, patch: str, dataset: str, split_file: Path, lineno: int) -> tuple[str, int, int]:
    where = f"{split_file}:{lineno}"
    roi = _roi_of_token(season, dataset, where)
    scene, patch = scene.strip(), patch.strip()
    if not (scene.isascii() and scene.isdigit() and patch.isascii() and patch.isdigit()):
        raise SatfuseError(f"{where}: Scene and ID must be integers (ASCII digits), got {scene!r}, {patch!r}")
    return roi, int(scene), int(patch)


def _name_id(name: str, dataset: str, split_file: Path, lineno: int) -> tuple[str, int, int]:
    """A list entry `ROIs1158_spring_s2_124_p100.tif` (optionally with folders) -> id."""
    base = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    m = _FILE_RE.match(base)
    if not m:
        raise SatfuseError(f"{split_file}:{lineno}: {name.strip()!r} is not a patch file name like ROIs1158_spring_s2_124_p100.tif")
    roi = m["roi"]
    if roi not in ROIS[dataset]:
        other = next((d for d, rois in ROIS.items() if roi in rois), None)
        hint = f"pass --dataset {other}" if other else f"{dataset} has {', '.join(ROIS[dataset])}"
        raise SatfuseError(f"{split_file}:{lineno}: {base} is not a {dataset} patch; {hint}")
    return roi, int(m["scene"]), int(m["patch"])


def read_scene_list(path: Path, dataset: str) -> set[tuple[str, int]]:
    """A scene list such as SEN12MS_holdOutScenes.txt (`ROIs1158_spring/s1_63` per line)."""
    path = Path(path)
    out: set[tuple[str, int]] = set()
    for lineno, line in enumerate(_text_lines(path, "scene list"), start=1):
        text = line.strip()
        if not text:
            continue
        m = _SCENE_LINE_RE.match(text)
        if not m:
            raise SatfuseError(f"{path}:{lineno}: {text!r} is not a scene like ROIs1158_spring/s1_63; pass a scene list (SEN12MS_holdOutScenes.txt)")
        if m["roi"] not in ROIS[dataset]:
            raise SatfuseError(f"{path}:{lineno}: {m['roi']} is not a {dataset} ROI ({', '.join(ROIS[dataset])})")
        out.add((m["roi"], int(m["scene"])))
    if not out:
        raise SatfuseError(f"{path}: the scene list is empty; pass a list with at least one scene")
    return out


def write_split(path: Path, ids: list[tuple[str, int, int]]) -> None:
    """Write a split list as the seed paper's authors publish it: no header, `Seasons.X,scene,id`
    with X = SPRING..WINTER for SEN12MS and VALSET / TESTSET for DFC2020; atomically."""
    from satfuse.utils import atomic_write_text

    lines = [f"Seasons.{ROI_TOKEN[roi]},{scene},{patch}" for roi, scene, patch in ids]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))


def write_list_txt(path: Path, ids: list[tuple[str, int, int]]) -> None:
    """Write a SEN12MS `*_list.txt`: one S2 file name per line, CRLF line ends (as published)."""
    from satfuse.utils import atomic_write_text

    atomic_write_text(Path(path), "".join(f"{roi}_s2_{scene}_p{patch}.tif\r\n" for roi, scene, patch in ids))


def write_list_pkl(path: Path, ids: list[tuple[str, int, int]]) -> None:
    """Write a SEN12MS `*_list.pkl`: a pickled list of S2 file names (protocol 3), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pickle.dumps([f"{roi}_s2_{scene}_p{patch}.tif" for roi, scene, patch in ids], protocol=3))
    tmp.replace(path)


def write_scene_list(path: Path, scenes: list[tuple[str, int]]) -> None:
    """Write a scene list like SEN12MS_holdOutScenes.txt (`ROIs1158_spring/s1_63`, LF)."""
    from satfuse.utils import atomic_write_text

    atomic_write_text(Path(path), "".join(f"{roi}/s1_{scene}\n" for roi, scene in scenes))


# --------------------------------------------------------------------------------------------
# A user's own pairs
# --------------------------------------------------------------------------------------------


def pair_key(rel_s2: str) -> str:
    """Sample key of a user's pair: the S2 path without suffix, every non-[A-Za-z0-9_-] as '_'."""
    stem = rel_s2[: -len(Path(rel_s2).suffix)] if Path(rel_s2).suffix else rel_s2
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def scan_pairs(root: Path, pairs_file: Path) -> ScanResult:
    """Pairs listed in a CSV (s1,s2[,label]; paths relative to `root`), any folder layout.

    Rows whose files are missing, rows listed twice and keys that collide are excluded with
    their reason; every file under `root` that no row uses is returned as ignored.
    """
    root, pairs_file = Path(root), Path(pairs_file)
    if not root.is_dir():
        raise SatfuseError(f"{root}: source directory does not exist; pass the folder the paths of {pairs_file} are relative to")
    lines = _text_lines(pairs_file, "pairs file")
    rows = list(csv.reader(lines))
    rows = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not rows:
        raise SatfuseError(f"{pairs_file}: empty; it needs a header s1,s2[,label] and one row per pair")
    header = [c.strip().lower() for c in rows[0][1]]
    if "s1" not in header or "s2" not in header:
        raise SatfuseError(f"{pairs_file}: header {rows[0][1]} needs the columns s1,s2 (and optionally label)")
    if not rows[1:]:
        raise SatfuseError(f"{pairs_file}: the list is empty (a header and no rows); add one row per pair")
    i1, i2 = header.index("s1"), header.index("s2")
    il = header.index("label") if "label" in header else None
    pairs: dict[str, Pair] = {}
    excluded: list[Excluded] = []
    used: set[str] = set()
    dup: set[str] = set()
    for lineno, row in rows[1:]:
        cells = [c.strip() for c in row]
        need = max(i1, i2, il if il is not None else 0)
        if len(cells) <= need or not cells[i1] or not cells[i2] or (il is not None and not cells[il]):
            raise SatfuseError(f"{pairs_file}:{lineno}: needs a value in each of the columns {', '.join(header)}; got {row}")
        rels = {"s1": cells[i1], "s2": cells[i2]} | ({"label": cells[il]} if il is not None else {})
        paths = {k: root / v for k, v in rels.items()}
        key = pair_key(rels["s2"])
        gone = [f"{k} {v}" for k, v in rels.items() if not paths[k].is_file()]
        used.update(os.path.normpath(v) for v in rels.values())
        if gone:
            excluded.append(Excluded(key, f"missing: {pairs_file}:{lineno} lists {', '.join(gone)}, not found under {root}", [str(p) for p in paths.values()]))
            continue
        if key in pairs or key in dup:
            dup.add(key)
            excluded.append(Excluded(key, f"duplicate: {pairs_file}:{lineno} lists S2 {rels['s2']} (or one with the same key) again; list each pair once", [str(p) for p in paths.values()]))
            continue
        pairs[key] = Pair(key, "pairs", "", 0, lineno, paths["s1"], paths["s2"], paths.get("label"))
    for key in dup:  # the first row of a duplicated key is ambiguous too
        first = pairs.pop(key, None)
        if first is not None:
            excluded.append(Excluded(key, f"duplicate: {pairs_file}:{first.patch} and later rows name the same pair; list each pair once", [str(first.s1), str(first.s2)]))
    ignored = _unused_files(root, used, pairs_file)
    excluded.sort(key=lambda e: (e.key, e.reason))
    return ScanResult(sorted(pairs.values(), key=lambda p: p.key), excluded, "label" if il is not None else None, ignored)


def _unused_files(root: Path, used: set[str], pairs_file: Path) -> list[Ignored]:
    """Every file under `root` no pair uses (symlink loops reported, never followed)."""
    out: list[Ignored] = []
    used_dirs = {str(parent) for u in used for parent in Path(u).parents if str(parent) != "."}
    try:
        own = os.path.normpath(os.path.relpath(pairs_file, root))
    except ValueError:
        own = ""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.normpath(os.path.relpath(os.path.join(dirpath, name), root))
            if rel in used or rel in used_dirs:  # used, or a (linked) folder holding used files
                continue
            reason = "the pairs file itself" if rel == own else f"not listed in {pairs_file}"
            out.append(Ignored(rel, reason))
    return out
