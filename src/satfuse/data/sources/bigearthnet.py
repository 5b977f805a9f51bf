"""BigEarthNet-MM v1.0 and BigEarthNet v2.0 (reBEN) as published, and how pairs are found.

v1.0 (archives extract to `BigEarthNet-v1.0/` for S2 - not `-S2-` - and `BigEarthNet-S1-v1.0/`):

    {root}/BigEarthNet-v1.0/{s2}/{s2}_B01.tif ... _B12.tif (no B10), {s2}_labels_metadata.json
    {root}/BigEarthNet-S1-v1.0/{s1}/{s1}_VV.tif, _VH.tif, {s1}_labels_metadata.json
    s2 = S2A_MSIL2A_20170617T113321_4_55, s1 = S1A_IW_GRDH_1SDV_20170617T064724_29UPU_4_55

  Pairs come from, in this order: `--split-file` (torchgeo's `bigearthnet-{split}.csv`: no
  header, `S2,S1` per line; or a one-column S2 list as in bigearthnet_common, joined through
  the mapping), `--split NAME` (= `{root}/bigearthnet-NAME.csv`), the official mapping
  `{root}/s1s2_mapping.csv` (no header, `S2,S1`), or, without any of these, each S1 JSON's
  `corresponding_s2_patch`. A split list that repeats a patch is read once per patch and the
  repeats are said (`split_lists.say_duplicates`; so is a repeated v2 patch_id). Labels: the S2 JSON's `labels` (43-class CORINE names) as a
  43-class multi-hot and its 19-class image. The snow and cloud lists
  (`{root}/patches_with_seasonal_snow.csv`, `patches_with_cloud_and_shadow.csv`: one S2
  name per line) turn their patches into listed exclusions.

v2.0 (reBEN):

    {root}/BigEarthNet-S2/{tile}/{patch_id}/{patch_id}_B01.tif ... (tile = patch_id minus its last 2 `_` fields)
    {root}/BigEarthNet-S1/{s1 minus its last 3 fields}/{s1}/{s1}_VV.tif, _VH.tif
    {root}/metadata.parquet: patch_id, labels (19-class names), split (train/validation/test),
        country, s1_name, s2v1_name, contains_seasonal_snow, contains_cloud_or_shadow
    {root}/metadata_for_patches_with_snow_cloud_or_shadow.parquet (same columns)

  Pairs and labels come from the parquet (joined by column, never by name rules: v2 patch
  ids are zero-padded, v1/S1 names are not); `--split train|val|validation|test` filters
  the `split` column; rows flagged snow/cloud, and every row of the snow/cloud parquet, are
  listed exclusions. Band files carry nodata=0 (recorded; pixels are packed as they are).
  Reference maps are not packed.

Bands: S2 12 bands B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B11 B12 (uint16; 120 px at 10 m, 60 px at
20 m, 20 px at 60 m), S1 VV, VH (float32 dB, 120 px) - the S1 order is ours (VV first, as in
SEN12MS), not torchgeo's sorted glob [VH, VV]. All UTM.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from satfuse.data.sources.band_scan import BandSample, BandScan
from satfuse.data.sources.layout import Excluded
from satfuse.data.sources.split_lists import say_duplicates
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

S1_BANDS = ["VV", "VH"]
S2_FILES = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"]
V1_S2_DIR, V1_S1_DIR = "BigEarthNet-v1.0", "BigEarthNet-S1-v1.0"
V2_S2_DIR, V2_S1_DIR = "BigEarthNet-S2", "BigEarthNet-S1"
MAPPING = "s1s2_mapping.csv"
SNOW, CLOUD = "patches_with_seasonal_snow.csv", "patches_with_cloud_and_shadow.csv"
V2_META, V2_SNOW_CLOUD = "metadata.parquet", "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}

# CORINE Land Cover nomenclature of BigEarthNet, in the original (torchgeo) order.
CLASSES_43 = (
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
    "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities",
    "Non-irrigated arable land", "Permanently irrigated land", "Rice fields", "Vineyards",
    "Fruit trees and berry plantations", "Olive groves", "Pastures", "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest", "Natural grassland",
    "Moors and heathland", "Sclerophyllous vegetation", "Transitional woodland/shrub", "Beaches, dunes, sands",
    "Bare rock", "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes",
    "Salines", "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons", "Estuaries", "Sea and ocean",
)  # fmt: skip
CLASSES_19 = (
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops", "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas", "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub", "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands",
    "Inland waters", "Marine waters",
)  # fmt: skip
# 43-class index -> 19-class index (None = dropped in the 19-class nomenclature).
OLD2NEW: dict[int, int] = {
    0: 0, 1: 0, 2: 1, 11: 2, 12: 2, 13: 2, 14: 3, 15: 3, 16: 3, 18: 3, 17: 4, 19: 5, 20: 6, 21: 7,
    22: 8, 23: 9, 24: 10, 25: 11, 31: 11, 26: 12, 27: 12, 28: 13, 29: 14, 33: 15, 34: 15, 35: 16,
    36: 16, 38: 17, 39: 17, 40: 18, 41: 18, 42: 18,
}  # fmt: skip


def multi_hot(names: list[str], classes: tuple[str, ...], where: str) -> list[int]:
    """Label names -> 0/1 list over `classes`; an unknown name is an error naming `where`."""
    index = {c: i for i, c in enumerate(classes)}
    out = [0] * len(classes)
    for name in names:
        if name not in index:
            raise SatfuseError(f"{where}: unknown label {name!r} (not one of the {len(classes)} BigEarthNet classes); check the file")
        out[index[name]] = 1
    return out


def to_19(labels43: list[int]) -> list[int]:
    """43-class multi-hot -> 19-class multi-hot (dropped classes vanish)."""
    out = [0] * 19
    for i, v in enumerate(labels43):
        if v and i in OLD2NEW:
            out[OLD2NEW[i]] = 1
    return out


def scan_bigearthnet(root: Path, version: int, split_file: Path | None = None, split: str | None = None) -> BandScan:
    root = Path(root)
    if not root.is_dir():
        raise SatfuseError(f"{root}: source directory does not exist; pass the BigEarthNet root")
    if split is not None and split not in SPLITS:
        raise SatfuseError(f"--split {split!r}: use one of {sorted(SPLITS)}")
    scan = _scan_v1(root, split_file, split) if version == 1 else _scan_v2(root, split_file, split)
    scan.excluded.sort(key=lambda e: (e.key, e.reason))
    scan.extras["classes"] = {"19": list(CLASSES_19), "43": list(CLASSES_43)}
    return scan


# --------------------------------------------------------------------------------------------
# v1
# --------------------------------------------------------------------------------------------


def read_name_list(path: Path) -> list[list[str]]:
    """Rows of a header-less CSV of patch names (CRLF or LF); a header row is skipped."""
    return [row for _, row in read_name_rows(path)]


def read_name_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, row) of a header-less CSV of patch names: the line numbers let a warning
    name the rows it is about (a split list's repeated rows)."""
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            rows = [(reader.line_num, [c.strip() for c in row]) for row in reader if row and row[0].strip()]
    except OSError as exc:
        raise SatfuseError(f"{path}: cannot read ({exc.strerror}); check the path") from None
    if rows and not rows[0][1][0].startswith(("S1", "S2")):
        rows = rows[1:]  # a header (the published files have none)
    # torchgeo reads `S2,S1`; a copy written S1-first is recognised by the names, not trusted blindly
    return [(n, [r[1], r[0], *r[2:]] if len(r) >= 2 and r[0].startswith("S1") and r[1].startswith("S2") else r) for n, r in rows]


def _split_rows(split_file: Path) -> list[list[str]]:
    """A split list's rows, each patch (S2 name) once: a repeated patch would otherwise be
    packed twice under one key; the repeats are said (`say_duplicates`), the first row kept."""
    numbered = read_name_rows(split_file)
    first = say_duplicates(split_file, [(n, r[0]) for n, r in numbered])
    return [r for n, r in numbered if first[r[0]] == n]


def _v1_pairs(root: Path, split_file: Path | None, split: str | None, ignored: list[dict[str, str]]) -> tuple[list[tuple[str, str]], str]:
    """(S2, S1) names and where they came from."""
    mapping_path = root / MAPPING
    mapping: dict[str, str] | None = None
    if mapping_path.is_file():
        mapping = {r[0]: r[1] for r in read_name_list(mapping_path) if len(r) >= 2}
    if split is not None and split_file is None:
        split_file = root / f"bigearthnet-{SPLITS[split].replace('validation', 'val')}.csv"
        if not split_file.is_file():
            raise SatfuseError(f"{split_file}: split list not found; download the official splits (torchgeo names them bigearthnet-{{train,val,test}}.csv) or pass --split-file")
    if split_file is not None:
        rows = _split_rows(Path(split_file))
        if rows and len(rows[0]) >= 2:
            return [(r[0], r[1]) for r in rows], str(split_file)
        if mapping is None:
            raise SatfuseError(f"{split_file}: lists S2 names only; the S1 partner needs {mapping_path} (the official s1s2_mapping.csv)")
        return [(r[0], mapping.get(r[0], "")) for r in rows], f"{split_file} + {MAPPING}"
    if mapping is not None:
        return sorted(mapping.items()), MAPPING
    pairs = []
    s1_root = root / V1_S1_DIR
    for d in sorted(p for p in s1_root.iterdir() if p.is_dir()) if s1_root.is_dir() else []:
        meta = d / f"{d.name}_labels_metadata.json"
        try:
            pairs.append((json.loads(meta.read_text())["corresponding_s2_patch"], d.name))
        except (OSError, ValueError, KeyError, TypeError):
            ignored.append({"path": str(d.relative_to(root)), "reason": f"no {MAPPING} and no readable corresponding_s2_patch in its JSON"})
    return pairs, "corresponding_s2_patch of each S1 JSON"


def _exclusion_lists(root: Path) -> tuple[dict[str, str], list[str]]:
    """S2 name -> reason, for the snow and cloud lists found in `root`."""
    reasons: dict[str, str] = {}
    found = []
    for name, what in ((SNOW, "seasonal snow"), (CLOUD, "cloud or cloud shadow")):
        path = root / name
        if path.is_file():
            found.append(name)
            for row in read_name_list(path):
                reasons.setdefault(row[0], f"{what}: listed in {name} (the publishers advise against using it)")
    return reasons, found


def _scan_v1(root: Path, split_file: Path | None, split: str | None) -> BandScan:
    s2_root, s1_root = root / V1_S2_DIR, root / V1_S1_DIR
    for d in (s2_root, s1_root):
        if not d.is_dir():
            raise SatfuseError(f"{root}: no {d.name}/ folder; extract BigEarthNet-S2-v1.0.tar.gz (-> {V1_S2_DIR}/) and BigEarthNet-S1-v1.0.tar.gz (-> {V1_S1_DIR}/) there")
    ignored: list[dict[str, str]] = []
    pairs, source = _v1_pairs(root, split_file, split, ignored)
    snowcloud, lists = _exclusion_lists(root)
    if not lists:
        log.warning("%s: no %s / %s found: snowy and cloudy patches are packed like the others", root, SNOW, CLOUD)
    samples, excluded, used = [], [], set()
    for s2, s1 in pairs:
        key = s2.replace(".", "_")
        if s2 in snowcloud:
            used.add(s1)  # listed as part of the exclusion, not as an unused folder
            excluded.append(Excluded(key, snowcloud[s2], [f"{V1_S2_DIR}/{s2}", f"{V1_S1_DIR}/{s1}"]))
            continue
        if not s1:
            excluded.append(Excluded(key, f"no S1 partner: {s2} is not in {MAPPING}; add the mapping row", []))
            continue
        s2_dir, s1_dir = s2_root / s2, s1_root / s1
        used.update((s2, s1))
        s2_files, s1_files, missing = _band_files(key, root, s2_dir, s2, s1_dir, s1)
        if missing is not None:
            excluded.append(missing)
            continue
        labels43 = _v1_labels(s2_dir / f"{s2}_labels_metadata.json", s1_dir / f"{s1}_labels_metadata.json")
        meta: dict[str, Any] = {"s2_name": s2, "s1_name": s1}
        if labels43 is not None:
            meta.update(labels43=labels43, labels19=to_19(labels43))
        samples.append(BandSample(key, s1_files, s2_files, meta))
    unused = [d for top in (s2_root, s1_root) for d in top.iterdir() if d.name not in used and d.name not in snowcloud]
    extras = {"pairs_from": source, "exclusion_lists": lists, "label_source": "S2 labels_metadata.json (43-class names)",
              "source_crs": "UTM of the S2 tile, per sample (its JSON crs/transform)"}  # fmt: skip
    if split_file is not None or split is not None:  # the rest of the release is expected: count it
        extras["folders_outside_split"] = len(unused)
    else:
        ignored += [{"path": str(d.relative_to(root)), "reason": f"not in the pair list ({source})"} for d in unused]
    return BandScan("bigearthnet", samples, excluded, sorted(ignored, key=lambda i: i["path"]), {"s1": list(S1_BANDS), "s2": list(S2_BANDS)}, extras)


def _band_files(key: str, root: Path, s2_dir: Path, s2: str, s1_dir: Path, s1: str) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]], Excluded | None]:
    """(S2 band files, S1 band files, the exclusion naming the missing ones or None) of a pair."""
    s2_files = [(b, s2_dir / f"{s2}_{f}.tif") for b, f in zip(S2_BANDS, S2_FILES, strict=True)]
    s1_files = [(b, s1_dir / f"{s1}_{b}.tif") for b in S1_BANDS]
    missing = [str(p.relative_to(root)) for _, p in s2_files + s1_files if not p.is_file()]
    if not missing:
        return s2_files, s1_files, None
    return s2_files, s1_files, Excluded(key, f"missing: {len(missing)} band file(s) of the pair ({missing[0]} ...); re-extract the archives", missing)


def _v1_labels(*jsons: Path) -> list[int] | None:
    for path in jsons:
        try:
            names = json.loads(path.read_text())["labels"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return multi_hot(list(names), CLASSES_43, str(path))
    return None


# --------------------------------------------------------------------------------------------
# v2 (reBEN)
# --------------------------------------------------------------------------------------------


def read_parquet(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a parquet file as dicts; a clear error for a missing file or column."""
    try:
        import pyarrow.parquet as pq  # lazy: --help stays fast (pyarrow; the CLI lists this dataset)
    except ImportError:
        raise SatfuseError("reading BigEarthNet v2 metadata.parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except OSError as exc:
        raise SatfuseError(f"{path}: not a readable parquet file ({exc}); re-download it") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise SatfuseError(f"{path}: lacks the column(s) {missing} (has {table.column_names}); re-download the BigEarthNet v2 metadata")
    return table.to_pylist()


def v2_s2_folder(patch_id: str) -> str:
    """`S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57` -> its tile-product folder."""
    return patch_id.rsplit("_", 2)[0]


def v2_s1_folder(s1_name: str) -> str:
    return s1_name.rsplit("_", 3)[0]


def _scan_v2(root: Path, split_file: Path | None, split: str | None) -> BandScan:
    meta_path = root / V2_META
    if not meta_path.is_file():
        raise SatfuseError(f"{meta_path}: not found; BigEarthNet v2 pairs come from metadata.parquet - download it next to {V2_S2_DIR}/ and {V2_S1_DIR}/")
    for d in (root / V2_S2_DIR, root / V2_S1_DIR):
        if not d.is_dir():
            raise SatfuseError(f"{root}: no {d.name}/ folder; extract BigEarthNet-S1.tar.zst and BigEarthNet-S2.tar.zst there")
    rows = read_parquet(meta_path, ("patch_id", "s1_name", "labels", "split"))
    first = say_duplicates(meta_path, [(i, r["patch_id"]) for i, r in enumerate(rows, start=1)], unit="row")
    rows = [r for i, r in enumerate(rows, start=1) if first[r["patch_id"]] == i]  # a repeated patch_id once, said above
    wanted: set[str] | None = None
    if split_file is not None:
        wanted = {r[0] for r in _split_rows(Path(split_file))}
    samples, excluded = [], []
    ignored: list[dict[str, str]] = []
    listed = set()
    for row in rows:
        pid = row["patch_id"]
        listed.add(pid)
        if (split is not None and row["split"] != SPLITS[split]) or (wanted is not None and pid not in wanted):
            continue
        key = pid.replace(".", "_")
        flags = [what for col, what in (("contains_seasonal_snow", "seasonal snow"), ("contains_cloud_or_shadow", "cloud or shadow")) if row.get(col)]
        if flags:
            excluded.append(Excluded(key, f"{' and '.join(flags)}: flagged in {V2_META}", []))
            continue
        s2_dir = root / V2_S2_DIR / v2_s2_folder(pid) / pid
        s1 = row["s1_name"]
        s1_dir = root / V2_S1_DIR / v2_s1_folder(s1) / s1
        s2_files, s1_files, missing = _band_files(key, root, s2_dir, pid, s1_dir, s1)
        if missing is not None:
            excluded.append(missing)
            continue
        labels = list(row["labels"] or [])
        meta = {
            "s2_name": pid, "s1_name": s1, "s2v1_name": row.get("s2v1_name"), "split": row["split"],
            "country": row.get("country"), "labels19": multi_hot(labels, CLASSES_19, f"{meta_path} row {pid}"),
        }  # fmt: skip
        samples.append(BandSample(key, s1_files, s2_files, meta))
    if wanted is not None:
        for pid in sorted(wanted - listed):
            excluded.append(Excluded(pid, f"missing: listed in {split_file} but not a row of {V2_META}", []))
    lists = []
    sc_path = root / V2_SNOW_CLOUD
    if sc_path.is_file():
        lists.append(V2_SNOW_CLOUD)
        for row in read_parquet(sc_path, ("patch_id",)):
            if split is not None and row.get("split") not in (None, SPLITS[split]):
                continue
            flags = [w for c, w in (("contains_seasonal_snow", "seasonal snow"), ("contains_cloud_or_shadow", "cloud or shadow")) if row.get(c)]
            excluded.append(Excluded(row["patch_id"], f"{' and '.join(flags) or 'snow, cloud or shadow'}: listed in {V2_SNOW_CLOUD}", []))
    extras = {"pairs_from": V2_META, "exclusion_lists": lists, "label_source": f"{V2_META} labels (19-class names)",
              "nodata": {"s2": 0}, "source_crs": "UTM of the S2 tile, per sample (its JSON crs/transform)"}  # fmt: skip
    return BandScan("bigearthnet-v2", samples, excluded, ignored, {"s1": list(S1_BANDS), "s2": list(S2_BANDS)}, extras)
