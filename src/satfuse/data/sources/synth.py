"""Synthetic SEN12MS and DFC2020 in exactly the real layout, with an honest signal.

Why synthetic data at all: the real downloads are hundreds of GB; the demo and the tests
need something small that behaves like them. Why an *honest* signal: pretraining and
fine-tuning must have something real to learn, or every later number is noise.

The world model, shared by both datasets (so pretraining on synthetic SEN12MS transfers to
synthetic DFC2020 as it should):
- per patch a spatially smooth land-cover map: warped Voronoi regions of IGBP classes whose
  mix depends on the scene (and on the season: snow in winter, more bare soil in spring);
- S2 (13 bands, uint16 L1C reflectance x 10000): a per-class spectrum (water dark in NIR,
  vegetation bright in NIR with a red edge, urban/barren flat and bright, snow bright in the
  visible and dark in SWIR), a smooth brightness field, 3% per-pixel noise, and clouds on
  about a quarter of the patches (S2 only: radar sees through clouds, which is exactly why
  the fused model should beat S2 alone);
- S1 (VV, VH float32 dB): per-class backscatter (water ~ -20 dB VV, urban ~ -5, forest ~ -8;
  VH 6-8 dB lower), a smooth texture and multiplicative gamma speckle (5 looks), NaN-free;
- labels: `lc` = IGBP plus LCCS land-cover/land-use/surface-hydrology codes derived from it;
  `dfc` = IGBP -> DFC2020 classes 1..10 (method.md's IGBP2DFC). DFC2020 patches get both,
  as the download has both.

Side files are the publishers' own, byte for byte in format (see satfuse.data.sources.layout):
SEN12MS gets `sen12ms_observations.csv` (the seed paper's list: no header,
`Seasons.SPRING,scene,id`), SEN12MS's `train_list.txt` / `test_list.txt` (S2 file names, CRLF)
and their `.pkl` twins, `labels/IGBP_probability_labels.pkl` (the scene-classification labels:
S2 file name -> 17 IGBP fractions of the patch's `lc` IGBP layer), and `SEN12MS_holdOutScenes.txt` (the test scenes, `ROI/s1_<scene>`);
DFC2020 gets `validation_observations.csv` / `test_observations.csv` (`Seasons.VALSET,0,id` /
`Seasons.TESTSET,0,id`) and the download's folder names (`s1_validation`, ..., `s1_0`).

Files are uncompressed, band-interleaved GeoTIFFs (our choice: fastest to read, ~1.7 MB
per 13-band 256x256 S2 patch; the reader takes any compression GDAL reads), in a real UTM CRS (EPSG:326xx, one zone per
scene) with a 10 m geotransform shared by the S1, S2 and label file of a patch. Patches of
one scene tile a grid without overlap (the real ones overlap by 50%; nothing here depends on
it). Every file is written under a temporary name and renamed, so a kill leaves no
half-written .tif that a later scan would pair. Output is a pure function of the seed.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine
from tqdm import tqdm

from satfuse.data.sources.igbp_labels import LABELS_FILE, igbp_fractions, write_igbp_labels
from satfuse.data.sources.layout import DFC2020_ROIS, IGBP2DFC, SEN12MS_ROIS, patch_path, season_of
from satfuse.data.sources.split_lists import (
    write_list_pkl,
    write_list_txt,
    write_scene_list,
    write_split,
)
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

PIXEL_M = 10.0
# Base S2 L1C spectra (B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B10 B11 B12), reflectance x 10000.
_MATERIALS: dict[str, list[float]] = {
    "water":   [1300, 1100, 900, 650, 550, 480, 450, 400, 360, 150, 10, 150, 100],
    "forest":  [1200, 950, 880, 620, 1100, 2200, 2700, 2850, 2950, 900, 18, 1500, 750],
    "shrub":   [1350, 1150, 1150, 1150, 1450, 1900, 2150, 2250, 2350, 800, 20, 2500, 1700],
    "savanna": [1300, 1050, 1050, 950, 1350, 2000, 2400, 2500, 2600, 850, 20, 2200, 1400],
    "grass":   [1300, 1100, 1200, 1050, 1500, 2300, 2700, 2800, 2900, 880, 20, 2300, 1400],
    "wetland": [1250, 1000, 950, 750, 1000, 1600, 1900, 2000, 2100, 600, 15, 1100, 600],
    "crop":    [1250, 1050, 1180, 900, 1400, 2700, 3200, 3400, 3500, 1000, 20, 2100, 1150],
    "urban":   [1600, 1450, 1500, 1600, 1750, 1900, 2000, 2100, 2150, 700, 25, 2500, 2200],
    "snow":    [6000, 6200, 6300, 6300, 6300, 6200, 6100, 6000, 5900, 2500, 100, 800, 600],
    "barren":  [1700, 1650, 1950, 2350, 2650, 2850, 2950, 3050, 3150, 1000, 30, 3700, 3100],
}  # fmt: skip
_CLOUD = [7000, 7200, 7300, 7400, 7400, 7500, 7500, 7600, 7600, 3500, 1200, 5000, 3800]
# S1 backscatter per material: (VV dB, VH dB).
_S1_DB: dict[str, tuple[float, float]] = {
    "water": (-20.0, -27.0), "forest": (-7.5, -13.0), "shrub": (-10.0, -17.0),
    "savanna": (-9.0, -16.0), "grass": (-11.0, -18.0), "wetland": (-8.5, -17.5),
    "crop": (-10.0, -16.5), "urban": (-4.5, -11.0), "snow": (-12.0, -20.0),
    "barren": (-14.0, -23.0),
}  # fmt: skip
# IGBP 0..17 -> material (0 = no data, drawn as barren; never generated).
_IGBP_MATERIAL = (
    "barren", "forest", "forest", "forest", "forest", "forest", "shrub", "shrub", "savanna",
    "savanna", "grass", "wetland", "crop", "urban", "crop", "snow", "barren", "water",
)  # fmt: skip
# LCCS land cover / land use / surface hydrology codes per IGBP class (plausible, fixed).
_LCCS_LC = (0, 11, 12, 13, 14, 15, 21, 22, 31, 32, 36, 41, 35, 43, 35, 1, 1, 3)
_LCCS_LU = (0, 10, 10, 10, 10, 10, 20, 20, 30, 30, 36, 40, 36, 9, 25, 1, 1, 3)
_LCCS_SH = (0, 10, 10, 10, 10, 10, 20, 20, 30, 30, 40, 50, 40, 40, 40, 1, 1, 3)
# Which IGBP classes a scene of a season draws from (scene mixes are subsets of these).
_SEASON_CLASSES = {
    "spring": (1, 4, 5, 7, 9, 10, 11, 12, 13, 14, 16, 17),
    "summer": (1, 2, 4, 5, 6, 8, 10, 11, 12, 13, 14, 17),
    "fall": (1, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 16, 17),
    "winter": (1, 3, 5, 7, 10, 12, 13, 15, 16, 17),
}
_ALL_CLASSES = tuple(range(1, 18))


def _world_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per-IGBP-class S2 spectra (18, 13) and S1 dB (18, 2): material + a fixed class offset.

    The offsets come from a fixed world seed, not the user's seed: every dataset and every
    seed lives in the same world, so a model pretrained on one transfers to another.
    """
    rng = np.random.default_rng(20220101)
    s2 = np.array([_MATERIALS[m] for m in _IGBP_MATERIAL], dtype=np.float32)
    s2 *= rng.uniform(0.93, 1.07, size=(18, 1)).astype(np.float32)
    s1 = np.array([_S1_DB[m] for m in _IGBP_MATERIAL], dtype=np.float32)
    s1 += rng.uniform(-0.8, 0.8, size=(18, 1)).astype(np.float32)
    return s2, s1


_S2_TABLE, _S1_TABLE = _world_tables()


def _quantile_tables() -> tuple[np.ndarray, np.ndarray]:
    """Quantile tables of N(0, 1) (256 entries) and of 5-look gamma speckle (65536 entries).

    Why tables: drawing 850k float32 normals costs ~9 ms, more than everything else of a
    patch; indexing a quantile table with random bytes gives the same distribution (to
    1/256 resolution) in ~2 ms, still a pure function of the seed.
    """
    rng = np.random.default_rng(20220102)
    normal = np.sort(rng.standard_normal(1 << 18))
    gamma = np.sort(rng.standard_gamma(5.0, 1 << 20) / 5.0)
    q_normal = normal[(np.arange(256) * 2 + 1) << 9].astype(np.float32)
    q_gamma = gamma[(np.arange(65536) * 2 + 1) << 3]
    speckle_db = (10.0 * np.log10(np.maximum(q_gamma, 1e-6))).astype(np.float32)
    return q_normal, speckle_db


_NORMAL_Q, _SPECKLE_DB = _quantile_tables()


def _noise(rng: np.random.Generator, table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Samples of `table`'s distribution: random uint8/uint16 indices into the quantiles."""
    dtype = np.uint8 if len(table) == 256 else np.uint16
    n = int(np.prod(shape))
    idx = np.frombuffer(rng.bytes(n * np.dtype(dtype).itemsize), dtype=dtype)
    return table[idx].reshape(shape)
_CLOUD_SPECTRUM = np.array(_CLOUD, dtype=np.float32)[:, None, None]


def _smooth_field(rng: np.random.Generator, size: int, grid: int = 5) -> np.ndarray:
    """A smooth random field in [-1, 1]: a coarse grid bilinearly upsampled (two matmuls)."""
    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid)).astype(np.float32)
    pos = np.linspace(0.0, grid - 1.0, size, dtype=np.float32)
    lo = np.minimum(pos.astype(np.int64), grid - 2)
    frac = pos - lo
    interp = np.zeros((size, grid), dtype=np.float32)
    interp[np.arange(size), lo] = 1.0 - frac
    interp[np.arange(size), lo + 1] = frac
    return interp @ coarse @ interp.T


def land_cover(rng: np.random.Generator, size: int, classes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A (size, size) uint8 IGBP map: warped Voronoi regions whose classes follow `weights`."""
    k = int(rng.integers(3, 9))
    seeds = rng.uniform(0, size, size=(k, 2)).astype(np.float32)
    region_class = rng.choice(classes, size=k, p=weights)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    amp = size * 0.12
    wy = yy + amp * _smooth_field(rng, size)
    wx = xx + amp * _smooth_field(rng, size)
    dist = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
    return region_class[np.argmin(dist, axis=0)].astype(np.uint8)


def render_s2(rng: np.random.Generator, igbp: np.ndarray, season: str) -> np.ndarray:
    """(13, H, W) uint16 L1C reflectance from the class map: spectra, noise, clouds."""
    size = igbp.shape[0]
    s2 = _S2_TABLE.T[:, igbp]  # (13, H, W) float32
    gain = 1.0 + 0.08 * _smooth_field(rng, size)
    if season == "winter":  # leaf-off: less NIR and red edge on deciduous vegetation and crops
        gain *= np.where(np.isin(igbp, (3, 4, 5, 9, 10, 12, 14)), 0.8, 1.0).astype(np.float32)
    noise = _noise(rng, _NORMAL_Q, s2.shape)
    noise *= 0.03
    noise += 1.0
    s2 *= gain
    s2 *= noise
    if rng.random() < 0.25:  # a cloud bank over part of the patch
        alpha = np.clip(_smooth_field(rng, size, grid=4) * 1.8 - rng.uniform(0.0, 1.2), 0.0, 1.0)
        s2 = s2 * (1.0 - alpha) + _CLOUD_SPECTRUM * alpha
    return np.clip(s2, 1.0, 28000.0).astype(np.uint16)


def render_s1(rng: np.random.Generator, igbp: np.ndarray) -> np.ndarray:
    """(2, H, W) float32 VV/VH backscatter in dB: class level, texture, gamma speckle."""
    size = igbp.shape[0]
    db = _S1_TABLE.T[:, igbp]  # (2, H, W) float32
    db += _smooth_field(rng, size)
    db += _noise(rng, _SPECKLE_DB, db.shape)  # multiplicative speckle = additive in dB
    return db


def lc_bands(igbp: np.ndarray) -> np.ndarray:
    """(4, H, W) uint8: IGBP, LCCS-LC, LCCS-LU, LCCS-SH (the SEN12MS lc file)."""
    tables = [np.arange(18), _LCCS_LC, _LCCS_LU, _LCCS_SH]
    return np.stack([np.asarray(t, dtype=np.uint8)[igbp] for t in tables])


def dfc_band(igbp: np.ndarray) -> np.ndarray:
    """(1, H, W) uint8 DFC2020 classes 1..10."""
    return np.asarray(IGBP2DFC, dtype=np.uint8)[igbp][None]


def write_tif(path: Path, array: np.ndarray, crs: str, transform: Affine) -> None:
    """Write one uncompressed band-interleaved GeoTIFF atomically (temp name + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    count, height, width = array.shape
    profile = {
        "driver": "GTiff", "height": height, "width": width, "count": count,
        "dtype": array.dtype.name, "crs": crs, "transform": transform, "interleave": "band",
    }  # fmt: skip
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(array)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def scene_mix(rng: np.random.Generator, season: str) -> tuple[np.ndarray, np.ndarray]:
    """The classes of a scene and their weights: 2-5 classes of the season, Dirichlet mix."""
    pool = np.array(_SEASON_CLASSES.get(season, _ALL_CLASSES))
    n = int(rng.integers(2, 6))
    classes = rng.choice(pool, size=min(n, len(pool)), replace=False)
    return classes, rng.dirichlet(np.full(len(classes), 1.5))


def _geo(scene_rng: np.random.Generator, patch_index: int, size: int) -> tuple[str, Affine]:
    """A real UTM CRS (northern hemisphere zones) and the 10 m transform of a patch."""
    zone = int(scene_rng.integers(1, 61))
    x0 = float(scene_rng.integers(2, 7)) * 100_000.0
    y0 = float(scene_rng.integers(20, 80)) * 100_000.0
    row, col = divmod(patch_index, 16)
    x = x0 + col * size * PIXEL_M
    y = y0 - row * size * PIXEL_M
    return f"EPSG:{32600 + zone}", Affine(PIXEL_M, 0.0, x, 0.0, -PIXEL_M, y)


def _write_patch(root: Path, roi: str, scene: int, patch: int, arrays: dict[str, np.ndarray], crs: str, transform: Affine, validation_folders: str = "validation") -> None:
    for sensor, array in arrays.items():
        write_tif(patch_path(root, roi, sensor, scene, patch, validation_folders), array, crs, transform)


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix a new synthetic tree into an existing one unless told to replace it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SatfuseError(f"{out}: exists and is not a directory; choose another --out")
    patterns = ("ROIs*", "*_observations.csv", "*_list.txt", "*_list.pkl", "SEN12MS_holdOutScenes.txt", LABELS_FILE)
    existing = [p for pattern in patterns for p in out.glob(pattern)] if out.is_dir() else []
    if existing and not overwrite:
        raise SatfuseError(f"{out}: already holds a dataset ({existing[0].name} ...); pass --overwrite to replace it or choose another --out")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="patch", disable=not sys.stderr.isatty())


def write_sen12ms(out: Path, scenes: int, patches_per_scene: int, seed: int, size: int = 256, overwrite: bool = False) -> int:
    """Write a synthetic SEN12MS tree (s1, s2, lc) plus the published side files; returns pairs.

    Scenes go round-robin over the four seasons (scene ids 1..N, unique across ROIs; 4 or
    more scenes give all four ROI folders). Every fifth scene (and the last one when there
    are 2-4 scenes) is a test scene: listed in `test_list.txt/.pkl` and
    `SEN12MS_holdOutScenes.txt`; the others in `train_list.txt/.pkl`. All patches are in
    `sen12ms_observations.csv`.
    """
    _check_counts(scenes=scenes, patches_per_scene=patches_per_scene, size=size)
    out = Path(out)
    _prepare_out(out, overwrite)
    ids: list[tuple[str, int, int]] = []
    igbp_labels: dict[str, np.ndarray] = {}
    with _progress(scenes * patches_per_scene, "synth sen12ms") as bar:
        for i in range(scenes):
            roi, scene = SEN12MS_ROIS[i % 4], i + 1
            season = season_of(roi)
            scene_rng = np.random.default_rng([seed, 1, scene])
            classes, weights = scene_mix(scene_rng, season)
            for j in range(patches_per_scene):
                patch = j + 1
                rng = np.random.default_rng([seed, 2, scene, patch])
                igbp = land_cover(rng, size, classes, weights)
                arrays = {"s1": render_s1(rng, igbp), "s2": render_s2(rng, igbp, season), "lc": lc_bands(igbp)}
                crs, transform = _geo(np.random.default_rng([seed, 3, scene]), j, size)
                _write_patch(out, roi, scene, patch, arrays, crs, transform)
                igbp_labels[patch_path(out, roi, "s2", scene, patch).name] = igbp_fractions(arrays["lc"][0])
                ids.append((roi, scene, patch))
                bar.update(1)
    val_scenes = {s for s in range(1, scenes + 1) if s % 5 == 0} or ({scenes} if scenes >= 2 else set())
    train, test = [t for t in ids if t[1] not in val_scenes], [t for t in ids if t[1] in val_scenes]
    write_split(out / "sen12ms_observations.csv", ids)
    for name, part in (("train", train), ("test", test)):
        write_list_txt(out / f"{name}_list.txt", part)
        write_list_pkl(out / f"{name}_list.pkl", part)
    write_scene_list(out / "SEN12MS_holdOutScenes.txt", sorted({(roi, scene) for roi, scene, _ in test}, key=lambda t: t[1]))
    write_igbp_labels(out / LABELS_FILE, igbp_labels)
    log.info("wrote %d synthetic SEN12MS pairs (%d scenes, %dx%d) to %s", len(ids), scenes, size, size, out)
    return len(ids)


def write_dfc2020(out: Path, n_validation: int, n_test: int, seed: int, size: int = 256, overwrite: bool = False, validation_folders: str = "validation") -> int:
    """Write a synthetic DFC2020 tree (s1, s2, lc, dfc; scene 0) and its split lists; returns pairs.

    Patches are grouped into regions of 25 consecutive ids that share a class mix, a season
    and a UTM zone, like the real DFC2020 regions. Folders as in the download:
    `ROIs0000_validation/s1_validation/ROIs0000_validation_s1_0_p1.tif` and
    `ROIs0000_test/s1_0/...` (`validation_folders="0"` writes the renamed `s1_0` variant some
    loaders need). Split lists: `validation_observations.csv` / `test_observations.csv`, no
    header, `Seasons.VALSET,0,id` / `Seasons.TESTSET,0,id` (the seed paper's authors' files).
    """
    if validation_folders not in ("validation", "0"):
        raise SatfuseError(f"--validation-folders {validation_folders!r}: use 'validation' (the download) or '0' (renamed)")
    _check_counts(n_validation=n_validation, n_test=n_test, size=size)
    out = Path(out)
    _prepare_out(out, overwrite)
    seasons = ("spring", "summer", "fall", "winter")
    total = 0
    with _progress(n_validation + n_test, "synth dfc2020") as bar:
        for split_no, (roi, n) in enumerate(zip(DFC2020_ROIS, (n_validation, n_test), strict=True)):
            ids: list[tuple[str, int, int]] = []
            for j in range(n):
                patch, region = j + 1, j // 25
                region_rng = np.random.default_rng([seed, 11, split_no, region])
                season = seasons[int(region_rng.integers(0, 4))]
                classes, weights = scene_mix(region_rng, season)
                rng = np.random.default_rng([seed, 12, split_no, patch])
                igbp = land_cover(rng, size, classes, weights)
                arrays = {"s1": render_s1(rng, igbp), "s2": render_s2(rng, igbp, season), "lc": lc_bands(igbp), "dfc": dfc_band(igbp)}
                crs, transform = _geo(np.random.default_rng([seed, 13, split_no, region]), j % 25, size)
                _write_patch(out, roi, 0, patch, arrays, crs, transform, validation_folders)
                ids.append((roi, 0, patch))
                bar.update(1)
            write_split(out / f"{season_of(roi)}_observations.csv", ids)
            total += n
    log.info("wrote %d synthetic DFC2020 pairs (%dx%d) to %s", total, size, size, out)
    return total


def _check_counts(**values: int) -> None:
    for name, value in values.items():
        minimum = 8 if name == "size" else (0 if name in ("n_validation", "n_test") else 1)
        if value < minimum:
            flag = "--" + name.replace("_", "-")
            raise SatfuseError(f"{flag}={value} is too small; use at least {minimum}")
