"""Per-band GeoTIFFs at native resolutions -> one 10 m grid, with a geographic co-location check.

Why: SSL4EO-S12 and BigEarthNet store each band in its own file at its native resolution
(10 m bands 264/120 px, 20 m bands 132/60 px, 60 m bands 44/20 px), and S1 on a grid of
its own (SSL4EO-S12: a separate GEE export in EPSG:4326). A shard sample is one (C, H, W)
array per sensor on one grid, so every band is resampled onto the grid of the sample's
*reference band* (the first S2 band with the most pixels: a 10 m band).

How, and the contract recorded in every manifest:
- co-location: each band's footprint (its bounds) is reprojected into a metric CRS - the
  reference band's CRS when it is projected, else the UTM zone of the reference centre
  (SSL4EO-S12 is EPSG:4326) - and every edge must lie within `tol_m + pixel/2` metres of
  the reference footprint's edge, where `pixel` is that band's own pixel size in metres
  (a 60 m band's grid can only align to within half of its pixel). Identical transforms
  are not required: S1 and S2 of SSL4EO-S12 are separate exports whose grids differ;
- pixels: once the footprints agree, each band is read with GDAL's resampling `method`
  straight to the reference band's height x width (rasterio `read(out_shape=...)`): a
  band's pixel grid is stretched over the reference footprint, which is what the dataset
  authors' loaders do (cv2.resize / rasterio out_shape); the reference band itself is
  read as is;
- the output grid (CRS, transform, size) is the reference band's.
"""

from __future__ import annotations

import math
import threading
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.warp import transform_bounds

# Methods that make sense for upsampling continuous reflectance / backscatter (GDAL names).
METHODS = ("bilinear", "nearest", "cubic", "cubic_spline", "lanczos", "average")
DEFAULT_METHOD = "bilinear"
# The default `--colocation-tol-m` is each dataset's (`SourceDataset.colocation_tol_m`, as published).

_OPEN_LOCK = threading.Lock()  # catch_warnings edits process-global filters


class BandError(Exception):
    """A band file that cannot be trusted (unreadable, more than one band, wrong kind of dtype)."""


class Misaligned(Exception):
    """The footprints of a sample's band files do not agree within the tolerance."""


@dataclass
class BandInfo:
    """Header of one single-band file: enough to check co-location and plan the read."""

    path: Path
    crs: CRS | None
    transform: tuple[float, ...]
    height: int
    width: int
    dtype: str
    nodata: float | None
    bounds: tuple[float, float, float, float]
    dataset: Any = None  # the open rasterio dataset when opened by `open_bands` (read without reopening)


def resampling(method: str) -> Resampling:
    """GDAL resampling of a method name; ValueError listing the choices."""
    if method not in METHODS:
        raise ValueError(f"unknown resampling method {method!r}; use one of {list(METHODS)}")
    return Resampling[method]


def _open(path: Path) -> Any:
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise BandError(f"unreadable: {path} is not a readable GeoTIFF ({msg}); re-download or regenerate it") from None


def _info(path: Path, ds: Any) -> BandInfo:
    if ds.count != 1:
        raise BandError(f"wrong bands: {path} has {ds.count} bands, a per-band file needs 1; check --dataset")
    return BandInfo(Path(path), ds.crs, tuple(ds.transform)[:6], ds.height, ds.width, ds.dtypes[0], ds.nodata, tuple(ds.bounds))


def band_info(path: Path) -> BandInfo:
    """Read one file's header; BandError when it is not a single-band raster."""
    with _open(path) as ds:
        return _info(path, ds)


def open_bands(paths: list[Path], stack: ExitStack) -> list[BandInfo]:
    """Open every file once (closed with `stack`) and read its header.

    Why: a sample is 14 files; opening each once instead of twice (header, then pixels)
    halves the dominant cost of packing (rasterio.open is ~1-3 ms here)."""
    infos = []
    for path in paths:
        ds = stack.enter_context(_open(path))
        info = _info(path, ds)
        info.dataset = ds
        infos.append(info)
    return infos


def metric_crs(info: BandInfo) -> CRS:
    """The reference band's CRS if projected, else the UTM zone of its centre."""
    if info.crs is None:
        raise Misaligned(f"not georeferenced: {info.path} has no CRS, so co-location cannot be checked; restore its georeferencing or remove the sample")
    if info.crs.is_projected:
        return info.crs
    left, bottom, right, top = transform_bounds(info.crs, "EPSG:4326", *info.bounds)
    lon, lat = (left + right) / 2, (bottom + top) / 2
    zone = min(max(int((lon + 180) // 6) + 1, 1), 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def footprint_gaps(infos: list[BandInfo], ref: BandInfo, tol_m: float) -> list[str]:
    """Problems (one per band off by more than its tolerance); empty when all agree."""
    return footprint_check(infos, ref, tol_m)[0]


def footprint_check(infos: list[BandInfo], ref: BandInfo, tol_m: float) -> tuple[list[str], list[float]]:
    """(problems, offsets): one problem per band off by more than its tolerance, and every
    band's offset in metres (the largest gap between an edge of its footprint and the
    reference footprint's, in the metric CRS; inf without a CRS) in the order of `infos`.

    Why the offsets too: the tolerance is a per-dataset judgement of how the data was
    published, so the measured offset of every sample is recorded for users to check it."""
    dst = metric_crs(ref)
    boxes: dict[tuple, tuple[float, ...]] = {}  # bands sharing CRS and bounds are reprojected once

    def box_of(info: BandInfo) -> tuple[float, ...]:
        ident = (info.crs.to_wkt(), info.bounds)
        if ident not in boxes:
            same = info.crs == dst
            boxes[ident] = tuple(info.bounds) if same else tuple(transform_bounds(info.crs, dst, *info.bounds, densify_pts=21))
        return boxes[ident]

    ref_box = box_of(ref)
    problems: list[str] = []
    offsets: list[float] = []
    for info in infos:
        if info.crs is None:
            problems.append(f"not georeferenced: {info.path} has no CRS")
            offsets.append(math.inf)
            continue
        box = box_of(info)
        pixel = max((box[2] - box[0]) / max(info.width, 1), (box[3] - box[1]) / max(info.height, 1))
        gap = max(abs(a - b) for a, b in zip(box, ref_box, strict=True))
        offsets.append(gap)
        allowed = tol_m + pixel / 2
        if not math.isfinite(gap) or gap > allowed:
            problems.append(f"{info.path.name} footprint is {gap:.1f} m off {ref.path.name} (allowed {allowed:.1f} m = tolerance {tol_m:g} m + half its {pixel:.0f} m pixel)")
    return problems, offsets


def read_resampled(info: BandInfo, shape: tuple[int, int], method: str) -> np.ndarray:
    """The band as a (H, W) array of its own dtype on `shape`, resampled with `method`."""
    with nullcontext(info.dataset) if info.dataset is not None else _open(info.path) as ds:
        try:
            if (ds.height, ds.width) == shape:
                return ds.read(1)
            return ds.read(1, out_shape=shape, resampling=resampling(method))
        except RasterioError as exc:
            msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise BandError(f"unreadable: {info.path} could not be read ({msg}); re-download or regenerate it") from None
