"""Synthetic SSL4EO-S12 and BigEarthNet (v1, v2) in the publishers' exact layouts.

Why: the real archives are 1.5 TB and 120 GB; tests and demos need the same paths, names,
per-band files at native resolutions and side files (JSON, CSV, parquet) in megabytes. The
signal is the SEN12MS generator's world (`satfuse.data.sources.synth`): a land-cover map per patch
drives per-class S2 spectra and S1 backscatter with speckle and clouds - the generator's
functions are called, not copied, so every synthetic dataset lives in the same world.

What each writes (layout facts in the docstrings of `ssl4eo` and `bigearthnet`):
- SSL4EO-S12: `s1/`, `s2c/` (L1C, 13 bands), `s2a/` (L2A, 12 bands) / 7-digit location /
  GEE-style timestamp folders with `{band}.tif` (10 m `size`, 20 m `size/2`, 60 m
  `size/6` px) and `metadata.json`, EPSG:4326 degree grids; S1 and each S2 level get their
  own dates (independent searches) and S1 its own grid around the same centre, a few 10 m
  pixels larger or smaller, as the published exports are (`s1_grid`).
- BigEarthNet v1: `BigEarthNet-v1.0/` + `BigEarthNet-S1-v1.0/` flat patch folders,
  `{name}_B01.tif`... (120/60/20 px at `size` 120) and `_labels_metadata.json` (43-class
  names; S1 JSON with the real `lly` key), `s1s2_mapping.csv` and
  `bigearthnet-{train,val,test}.csv` (no header, `S2,S1`), the snow and cloud lists.
- BigEarthNet v2: nested `BigEarthNet-S2/{tile}/{patch_id}/`, `BigEarthNet-S1/{s1
  product}/{s1}/`, `Reference_Maps/` (CLC level-3 codes, uint16, DEFLATE, nodata 0), S2
  band files with nodata 0, `metadata.parquet` and the snow/cloud parquet.
Labels are honest: a patch's CORINE classes are those covering at least 2% of its
land-cover map (IGBP -> CORINE table below). Output is a pure function of the seed.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from rasterio.transform import Affine

from satfuse.data.sources import synth
from satfuse.data.sources.bigearthnet import (
    CLASSES_19,
    CLASSES_43,
    OLD2NEW,
    S2_FILES,
    V2_META,
    V2_SNOW_CLOUD,
)
from satfuse.utils import SatfuseError, atomic_write_text

log = logging.getLogger(__name__)

L1C = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
RES = {"B1": 60, "B9": 60, "B10": 60, "B5": 20, "B6": 20, "B7": 20, "B8A": 20, "B11": 20, "B12": 20}
# IGBP class (1..17) -> CORINE 43-class index (a plausible, fixed correspondence).
IGBP_CORINE = {1: 23, 2: 22, 3: 23, 4: 22, 5: 24, 6: 27, 7: 28, 8: 21, 9: 25, 10: 17, 11: 33, 12: 11, 13: 1, 14: 19, 15: 31, 16: 30, 17: 39}
# CORINE level-3 codes of the 43 classes, in CLASSES_43 order (reference-map pixel values).
CLC_CODES = (111, 112, 121, 122, 123, 124, 131, 132, 133, 141, 142, 211, 212, 213, 221, 222, 223, 231, 241, 242, 243, 244,
             311, 312, 313, 321, 322, 323, 324, 331, 332, 333, 334, 411, 412, 421, 422, 423, 511, 512, 521, 522, 523)  # fmt: skip
_SEASONS = ("winter", "spring", "summer", "fall")
_REF_DATES = (datetime(2020, 12, 21), datetime(2021, 3, 20), datetime(2021, 6, 21), datetime(2021, 9, 22))


def _write_band(path: Path, band: np.ndarray, crs: str, transform: Affine, nodata: float | None = None, compress: str | None = None) -> None:
    """One single-band GeoTIFF, atomically (temp name + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    profile = {"driver": "GTiff", "height": band.shape[0], "width": band.shape[1], "count": 1,
               "dtype": band.dtype.name, "crs": crs, "transform": transform}  # fmt: skip
    if nodata is not None:
        profile["nodata"] = nodata
    if compress:
        profile.update(compress=compress, predictor=2)
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(band, 1)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _block_mean(band: np.ndarray, factor: int) -> np.ndarray:
    """Downsample a 10 m band to 20/60 m by averaging factor x factor blocks."""
    h, w = band.shape
    return band.reshape(h // factor, factor, w // factor, factor).astype(np.float32).mean(axis=(1, 3)).astype(band.dtype)


def _native(name: str, band: np.ndarray) -> np.ndarray:
    return _block_mean(band, RES.get(name, 10) // 10) if RES.get(name, 10) > 10 else band


def _l2a(s2_l1c: np.ndarray) -> np.ndarray:
    """A crude surface reflectance from L1C: less path radiance in the blue, B10 dropped."""
    haze = np.array([900, 600, 400, 250, 200, 150, 120, 100, 100, 80, 0, 50, 30], dtype=np.float32)[:, None, None]
    sr = np.clip(s2_l1c.astype(np.float32) - haze, 1.0, 28000.0).astype(np.uint16)
    return np.delete(sr, L1C.index("B10"), axis=0)


def _labels43(igbp: np.ndarray, min_fraction: float = 0.02) -> list[int]:
    """CORINE classes covering at least `min_fraction` of the map, sorted."""
    counts = np.bincount(igbp.ravel(), minlength=18) / igbp.size
    return sorted({IGBP_CORINE[c] for c in range(1, 18) if counts[c] >= min_fraction})


def _prepare(out: Path, names: list[str], overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SatfuseError(f"{out}: exists and is not a directory; choose another --out")
    existing = [out / n for n in names if (out / n).exists()] if out.is_dir() else []
    if existing and not overwrite:
        raise SatfuseError(f"{out}: already holds a dataset ({existing[0].name} ...); pass --overwrite to replace it or choose another --out")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_size(size: int, multiple: int = 6) -> None:
    if size < 12 or size % multiple:
        raise SatfuseError(f"--size {size}: must be a multiple of {multiple} and at least 12 (the 60 m bands are size/6 pixels)")


# --------------------------------------------------------------------------------------------
# SSL4EO-S12
# --------------------------------------------------------------------------------------------


def write_ssl4eo(out: Path, locations: int = 4, seed: int = 0, size: int = 264, overwrite: bool = False) -> int:
    """Write synthetic SSL4EO-S12 v1 (s1, s2c, s2a; 4 timestamps per location); returns the
    number of (location, timestamp) samples per S2 level."""
    _check_size(size)
    if locations < 1:
        raise SatfuseError(f"--locations {locations}: use at least 1")
    out = _prepare(out, ["s1", "s2c", "s2a"], overwrite)
    for i in range(locations):
        loc = f"{i:07d}"  # 0000000, 0000001 ...: torchgeo opens f"{index:07}" for index < len
        rng = np.random.default_rng([seed, 31, i])
        lat, lon = float(rng.uniform(-50, 60)), float(rng.uniform(-170, 170))
        dy = 10.0 / 111_320.0
        dx = dy / np.cos(np.radians(lat))
        half = size / 2
        offset = int(rng.integers(0, 365))
        classes, weights = synth.scene_mix(rng, "summer")
        igbp = synth.land_cover(rng, size, classes, weights)  # one place, four seasons
        for t, ref in enumerate(_REF_DATES):
            season = _SEASONS[t]
            day = ref - timedelta(days=offset)
            dates = {k: day + timedelta(days=float(rng.uniform(-15, 15)), seconds=int(rng.integers(0, 86400))) for k in ("s1", "s2c", "s2a")}
            trng = np.random.default_rng([seed, 32, i, t])
            s2 = synth.render_s2(trng, igbp, season)
            s1 = synth.render_s1(trng, igbp)
            tile = f"T{int(rng.integers(10, 60))}{'CDEFGHJKLMNPQRSTUVWX'[int(rng.integers(0, 20))]}{'ABC'[t % 3]}{'PQR'[t % 3]}"
            grid = Affine(dx, 0.0, lon - half * dx, 0.0, -dy, lat + half * dy)
            for level, cube, bands in (("s2c", s2, L1C), ("s2a", _l2a(s2), [b for b in L1C if b != "B10"])):
                d = dates[level]
                name = f"{d:%Y%m%dT%H%M%S}_{d + timedelta(seconds=97):%Y%m%dT%H%M%S}_{tile}"
                folder = out / level / loc / name
                for k, band in enumerate(bands):
                    factor = RES.get(band, 10) // 10
                    _write_band(folder / f"{band}.tif", _native(band, cube[k]), "EPSG:4326", grid @ Affine.scale(factor))
                _write_meta(folder, name, d, level)
            d = dates["s1"]
            name = f"S1A_IW_GRDH_1SDV_{d:%Y%m%dT%H%M%S}_{d + timedelta(seconds=25):%Y%m%dT%H%M%S}_0{int(rng.integers(10000, 99999))}_03CFBA_D457"
            s1_grid = _s1_grid(rng, grid, size)
            for k, band in enumerate(("VV", "VH")):
                _write_band(out / "s1" / loc / name / f"{band}.tif", s1[k], "EPSG:4326", s1_grid)
            _write_meta(out / "s1" / loc / name, name, d, "s1")
    log.info("wrote synthetic SSL4EO-S12: %d locations x 4 timestamps (%d px at 10 m) to %s", locations, size, out)
    return locations * 4


def _s1_grid(rng: np.random.Generator, s2_grid: Affine, size: int) -> Affine:
    """S1's own grid, as the release has it: S1 and S2 were exported separately from the
    same region around the same centre, each sampled on its own image's pixels (`n` of them
    across the region), centre-cropped to `size` and georeferenced from the region's
    bounds; so S1's pixel is S2's times n_s2 / n_s1, about the same centre. Their raw pixel
    counts differ by up to 8 (edges up to ~40 m apart at 264 px; 38.5 m between VV and B2
    of the published location 0000200), fewer for small patches so an edge stays < 50 m."""
    n2 = size + 2  # the region's width in S2 pixels before the centre crop
    dn = int(rng.integers(1, max(2, min(8, size // 6)) + 1)) * (1 if rng.random() < 0.5 else -1)
    scale = n2 / (n2 + dn)
    cx, cy = s2_grid @ (size / 2, size / 2)
    return Affine.translation(cx, cy) @ Affine.scale(scale) @ Affine.translation(-cx, -cy) @ s2_grid


def _write_meta(folder: Path, name: str, date: datetime, level: str) -> None:
    props = {"system:index": name, "system:time_start": int(date.timestamp() * 1000)}
    if level == "s1":
        props.update(orbitProperties_pass="ASCENDING", instrumentMode="IW", transmitterReceiverPolarisation=["VV", "VH"])
    else:
        props.update(CLOUDY_PIXEL_PERCENTAGE=5.0, PROCESSING_BASELINE="02.14")
    atomic_write_text(folder / "metadata.json", json.dumps(props))


# --------------------------------------------------------------------------------------------
# BigEarthNet
# --------------------------------------------------------------------------------------------


def write_bigearthnet(out: Path, version: int = 1, patches: int = 12, seed: int = 0, size: int = 120, overwrite: bool = False) -> int:
    """Write synthetic BigEarthNet v1.0 or v2.0 (reBEN); returns the number of pairs written
    (snowy/cloudy ones included: they are written and listed, as in the release)."""
    _check_size(size)
    if version not in (1, 2):
        raise SatfuseError(f"--version {version}: use 1 or 2")
    if patches < 3:
        raise SatfuseError(f"--patches {patches}: use at least 3 (one per split)")
    names = ["BigEarthNet-v1.0", "BigEarthNet-S1-v1.0", "s1s2_mapping.csv", "patches_with_seasonal_snow.csv",
             "patches_with_cloud_and_shadow.csv", "bigearthnet-train.csv", "bigearthnet-val.csv", "bigearthnet-test.csv",
             "BigEarthNet-S2", "BigEarthNet-S1", "Reference_Maps", V2_META, V2_SNOW_CLOUD]  # fmt: skip
    out = _prepare(out, names, overwrite)
    rows = []
    for j in range(patches):
        rows.append(_ben_patch(out, version, j, seed, size))
    if version == 1:
        _write_v1_lists(out, rows)
    else:
        _write_v2_parquets(out, rows)
    log.info("wrote synthetic BigEarthNet v%d: %d pairs (%d px at 10 m) to %s", version, patches, size, out)
    return patches


def _ben_patch(out: Path, version: int, j: int, seed: int, size: int) -> dict:
    rng = np.random.default_rng([seed, 41, j])
    tile_no, col, row = j // 8, j % 8, j // 8 + 40
    day = datetime(2017, 6, 13, 10, 10, 31) + timedelta(days=29 * tile_no)
    season = _SEASONS[(day.month % 12) // 3]
    scene_rng = np.random.default_rng([seed, 42, tile_no])
    classes, weights = synth.scene_mix(scene_rng, season)
    if j % 7 == 3:  # a snowy patch (listed as such, as in the release)
        classes, weights = np.array([15, 16]), np.array([0.7, 0.3])
    igbp = synth.land_cover(rng, size, classes, weights)
    s2 = _l2a(synth.render_s2(rng, igbp, season))  # L2A: 12 bands, no B10
    s1 = synth.render_s1(rng, igbp)
    zone = 29 + tile_no % 5
    tile = f"{zone}U{'NPQ'[tile_no % 3]}U"
    crs = f"EPSG:{32600 + zone}"
    x0, y0 = 400_000.0 + col * size * 10.0, 5_800_000.0 - row * size * 10.0
    grid = Affine(10.0, 0.0, x0, 0.0, -10.0, y0)
    s1_day = day - timedelta(hours=3, minutes=23, seconds=7)
    s2v1 = f"S2A_MSIL2A_{day:%Y%m%dT%H%M%S}_{col}_{row}"
    s1_name = f"S1A_IW_GRDH_1SDV_{s1_day:%Y%m%dT%H%M%S}_{tile}_{col}_{row}"
    patch_id = f"S2A_MSIL2A_{day:%Y%m%dT%H%M%S}_N9999_R022_T{tile}_{col:02d}_{row:02d}"
    labels43 = _labels43(igbp)
    snow = j % 7 == 3
    cloud = j % 6 == 5
    if version == 1:
        s2_dir, s1_dir, s2_base = out / "BigEarthNet-v1.0" / s2v1, out / "BigEarthNet-S1-v1.0" / s1_name, s2v1
    else:
        s2_dir = out / "BigEarthNet-S2" / patch_id.rsplit("_", 2)[0] / patch_id
        s1_dir = out / "BigEarthNet-S1" / s1_name.rsplit("_", 3)[0] / s1_name
        s2_base = patch_id
    nodata = 0 if version == 2 else None
    for k, f in enumerate(S2_FILES):
        band = "B" + str(int(f[1:])) if f[1:].isdigit() else f
        factor = RES.get(band, 10) // 10
        _write_band(s2_dir / f"{s2_base}_{f}.tif", _native(band, s2[k]), crs, grid @ Affine.scale(factor), nodata=nodata)
    for k, b in enumerate(("VV", "VH")):
        _write_band(s1_dir / f"{s1_name}_{b}.tif", s1[k], crs, grid)
    names43 = [CLASSES_43[i] for i in labels43]
    if version == 1:
        proj = rasterio.crs.CRS.from_string(crs).to_wkt()
        s2_json = {"labels": names43, "coordinates": {"ulx": x0, "uly": y0, "lrx": x0 + size * 10, "lry": y0 - size * 10},
                   "projection": proj, "tile_source": f"S2A_MSIL1C_{day:%Y%m%dT%H%M%S}_N0205_R080_T{tile}_{day:%Y%m%dT%H%M%S}.SAFE",
                   "acquisition_date": f"{day:%Y-%m-%d %H:%M:%S}"}  # fmt: skip
        s1_json = {"labels": names43, "coordinates": {"ulx": x0, "uly": y0, "lrx": x0 + size * 10, "lly": y0 - size * 10},
                   "projection": proj, "corresponding_s2_patch": s2v1, "scene_source": s1_name.rsplit("_", 3)[0],
                   "acquisition_time": f"{s1_day:%Y-%m-%dT%H:%M:%S}"}  # fmt: skip
        atomic_write_text(s2_dir / f"{s2v1}_labels_metadata.json", json.dumps(s2_json))
        atomic_write_text(s1_dir / f"{s1_name}_labels_metadata.json", json.dumps(s1_json))
    else:
        codes = np.asarray(CLC_CODES, dtype=np.uint16)[[IGBP_CORINE.get(int(c), 30) for c in range(18)]][igbp]
        ref = out / "Reference_Maps" / patch_id.rsplit("_", 2)[0] / patch_id / f"{patch_id}_reference_map.tif"
        _write_band(ref, codes, crs, grid, nodata=0, compress="deflate")
    names19 = sorted({CLASSES_19[OLD2NEW[i]] for i in labels43 if i in OLD2NEW})
    split = ("train", "validation", "test")[0 if j % 4 < 2 else (1 if j % 4 == 2 else 2)]
    return {"patch_id": patch_id, "s2v1_name": s2v1, "s1_name": s1_name, "labels": names19, "split": split,
            "country": ("Austria", "Portugal", "Finland")[tile_no % 3], "snow": snow, "cloud": cloud}  # fmt: skip


def _write_v1_lists(out: Path, rows: list[dict]) -> None:
    def lines(items: list[str]) -> str:
        return "".join(f"{i}\n" for i in items)

    atomic_write_text(out / "s1s2_mapping.csv", lines([f"{r['s2v1_name']},{r['s1_name']}" for r in rows]))
    atomic_write_text(out / "patches_with_seasonal_snow.csv", lines([r["s2v1_name"] for r in rows if r["snow"]]))
    atomic_write_text(out / "patches_with_cloud_and_shadow.csv", lines([r["s2v1_name"] for r in rows if r["cloud"] and not r["snow"]]))
    clean = [r for r in rows if not (r["snow"] or r["cloud"])]
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        atomic_write_text(out / f"bigearthnet-{name}.csv", lines([f"{r['s2v1_name']},{r['s1_name']}" for r in clean if r["split"] == split]))


def _write_v2_parquets(out: Path, rows: list[dict]) -> None:
    def table(items: list[dict]) -> pa.Table:
        cols = {
            "patch_id": [r["patch_id"] for r in items], "labels": [r["labels"] for r in items],
            "split": [r["split"] for r in items], "country": [r["country"] for r in items],
            "s1_name": [r["s1_name"] for r in items], "s2v1_name": [r["s2v1_name"] for r in items],
            "contains_seasonal_snow": [r["snow"] for r in items], "contains_cloud_or_shadow": [r["cloud"] for r in items],
        }  # fmt: skip
        schema = pa.schema([("patch_id", pa.string()), ("labels", pa.list_(pa.string())), ("split", pa.string()),
                            ("country", pa.string()), ("s1_name", pa.string()), ("s2v1_name", pa.string()),
                            ("contains_seasonal_snow", pa.bool_()), ("contains_cloud_or_shadow", pa.bool_())])  # fmt: skip
        return pa.table(cols, schema=schema)

    for name, items in ((V2_META, [r for r in rows if not (r["snow"] or r["cloud"])]), (V2_SNOW_CLOUD, [r for r in rows if r["snow"] or r["cloud"]])):
        tmp = out / (name + ".part")
        pq.write_table(table(items), tmp)
        tmp.replace(out / name)
