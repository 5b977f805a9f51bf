"""Shard writer for datasets stored as one GeoTIFF per band (SSL4EO-S12, BigEarthNet v1/v2).

Why separate from `shard_writer`: SEN12MS stores a sensor per file on one shared grid, so a
pair is two reads and an identity check of transforms; these datasets store every band in
its own file at its native resolution, on grids that differ between S1 and S2. What is
shared is everything after the pixels are on one grid: the seeded plan, the atomic tar +
sidecar protocol, resume, job-array parts and `merge`, the manifest and its exact stats
sums - all shared with `shard_writer` (`shard_plan`, `tar_writer`, `shard_dir`, `manifest`) so both produce the same `satfuse-shards/1` format.

What this adds to the format (see shards/FORMAT.md and `satfuse.data.format.bands`):
- manifest `bands` {s1: [...], s2: [...]} (canonical names `B1`..`B12`, `B8A`, `VV`, `VH`;
  12 S2 bands where the product has no B10), `resample` {method, tolerance_m, grid},
  `dtype`, `patch_size`, `ignored` (files and folders the scan did not use, with why) and
  the dataset's own extras (label classes, exclusion lists, S2 level, pairing rule);
- per sample JSON: `bands`, `sources` (band -> file, relative to --src), `crs`,
  `transform`, `height`, `width`, `resample`, plus the dataset's fields (dates and their
  gap, labels as multi-hot lists, product names).
S1 is stored as float32 dB, S2 as uint16 (an int16 source is accepted when no value is
negative); S1 NaN/Inf and S2 values outside uint16 are bad data, as in `shard_writer`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from satfuse.data.format.codecs import Encoding, add_encoding
from satfuse.data.format.manifest import FORMAT, build, write_part
from satfuse.data.packing import shard_plan
from satfuse.data.packing.raster import BadData, NotColocated, npy_buffer
from satfuse.data.packing.resample import (
    DEFAULT_METHOD,
    METHODS,
    BandError,
    BandInfo,
    Misaligned,
    band_info,
    footprint_check,
    open_bands,
    read_resampled,
)
from satfuse.data.packing.shard_dir import (
    check_paths,
    named_out,
    prepare_out,
    publish_or_discard,
    remove_stale,
)
from satfuse.data.packing.tar_writer import (
    TAR_RECORD,
    Item,
    Packed,
    file_stamps,
    rel_path,
    write_tar,
)
from satfuse.data.sources.band_scan import BandSample, BandScan
from satfuse.data.sources.dataset import ScanOptions, SourceDataset
from satfuse.data.sources.layout import s1_range_problem
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

# Sentinel-2 native band resolutions (S1 GRD: 10 m) - what the files hold before resampling.
NATIVE_RESOLUTION_M = {
    "B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20, "B8": 10, "B8A": 20,
    "B9": 60, "B10": 60, "B11": 20, "B12": 20, "VV": 10, "VH": 10,
}  # fmt: skip
GRID_RULE = (
    "every band read with `method` onto the height x width of the reference band (the first S2 band "
    "with the most pixels, a 10 m band) after its footprint, reprojected to a metric CRS, lies within "
    "tolerance_m + half its own pixel of the reference footprint; output CRS/transform = the reference band's"
)


# --------------------------------------------------------------------------------------------
# Reading one sample
# --------------------------------------------------------------------------------------------


@dataclass
class SampleArrays:
    s1: np.ndarray  # float32 (2, H, W)
    s2: np.ndarray  # uint16 (C, H, W)
    ref: BandInfo
    offsets_m: dict[str, float] = field(default_factory=dict)  # largest footprint offset per sensor (resample.footprint_check)


def read_sample(sample: BandSample, method: str, tol_m: float) -> SampleArrays:
    """Check co-location and read every band onto the reference grid.

    Raises BadData (untrustworthy data) or NotColocated (footprints disagree)."""
    with rasterio.Env(), ExitStack() as stack:  # one GDAL environment and one open per file
        try:
            s1_infos = open_bands([p for _, p in sample.s1], stack)
            s2_infos = open_bands([p for _, p in sample.s2], stack)
        except BandError as exc:
            raise BadData(str(exc)) from None
        return _read_opened(sample, s1_infos, s2_infos, method, tol_m)


def _read_opened(sample: BandSample, s1_infos: list[BandInfo], s2_infos: list[BandInfo], method: str, tol_m: float) -> SampleArrays:
    for info in s2_infos:
        if np.dtype(info.dtype).kind not in "ui":
            raise BadData(f"wrong dtype: {info.path} is {info.dtype}, an S2 band must be an integer type (uint16/int16 reflectance x 10000)")
    for info in s1_infos:
        if np.dtype(info.dtype).kind not in "uif":
            raise BadData(f"wrong dtype: {info.path} is {info.dtype}, an S1 band must be numeric (float32 dB)")
    ref = max(s2_infos, key=lambda i: i.height * i.width)  # first of the largest
    shape = (ref.height, ref.width)
    try:  # pixels first: a truncated file (which also loses its georeferencing) is bad data
        s2_raw = [read_resampled(i, shape, method) for i in s2_infos]
        s1_raw = [read_resampled(i, shape, method) for i in s1_infos]
    except BandError as exc:
        raise BadData(str(exc)) from None
    try:
        problems, offsets = footprint_check(s1_infos + s2_infos, ref, tol_m)
    except Misaligned as exc:
        raise NotColocated(str(exc)) from None
    if problems:
        raise NotColocated(f"not co-located: {'; '.join(problems)}")
    s2 = np.empty((len(s2_raw), *shape), dtype=np.uint16)
    for k, (band, info) in enumerate(zip(s2_raw, s2_infos, strict=True)):
        lo, hi = int(band.min()), int(band.max())
        if lo < 0 or hi > 65535:
            raise BadData(f"out of range: {info.path} holds values {lo}..{hi}, S2 reflectance must fit uint16 (0..65535)")
        s2[k] = band
    s1 = np.stack([b.astype(np.float32, copy=False) for b in s1_raw])
    if not np.isfinite(s1).all():
        bad = int(np.count_nonzero(~np.isfinite(s1)))
        raise BadData(f"non-finite: {sample.key} S1 ({sample.s1[0][1].parent}) has {bad} NaN/Inf pixel(s); fill them or remove the sample")
    if (problem := s1_range_problem(s1, f"{sample.key} S1 ({sample.s1[0][1].parent})")) is not None:
        raise BadData(problem)
    n1 = len(s1_infos)
    measured = {"s1": round(max(offsets[:n1]), 1), "s2": round(max(offsets[n1:]), 1)}
    return SampleArrays(s1, s2, ref, measured)


def sample_dict(sample: BandSample, arrays: SampleArrays, dataset: str, src: Path, method: str) -> dict[str, Any]:
    """One WebDataset sample: s1.npy, s2.npy and the JSON of its provenance."""
    ref = arrays.ref
    meta = {
        "key": sample.key, "dataset": dataset, **sample.meta,
        "bands": {"s1": [b for b, _ in sample.s1], "s2": [b for b, _ in sample.s2]},
        "sources": {**{f"s1/{b}": rel_path(p, src) for b, p in sample.s1}, **{f"s2/{b}": rel_path(p, src) for b, p in sample.s2}},
        "crs": ref.crs.to_string() if ref.crs else None, "transform": list(ref.transform),
        "height": int(ref.height), "width": int(ref.width), "resample": method,
        "dtype": {"s1": "float32", "s2": "uint16"}, "colocation_offset_m": arrays.offsets_m,
    }  # fmt: skip
    out: dict[str, Any] = {"__key__": sample.key, "json": json.dumps(meta).encode()}
    for sensor, array in (("s1", arrays.s1), ("s2", arrays.s2)):
        buf, view = npy_buffer(array.shape, array.dtype)
        view[...] = array
        out[f"{sensor}.npy"] = buf
    return out


# --------------------------------------------------------------------------------------------
# Writing one shard (a worker process)
# --------------------------------------------------------------------------------------------


@dataclass
class BandShardTask:
    index: int
    name: str
    out: Path
    src: Path
    dataset: str
    samples: list[BandSample]
    exclude_bad: bool
    method: str
    tol_m: float
    s2_bands: int
    encoding: Encoding = field(default_factory=Encoding)


def _task_digest(task: BandShardTask) -> str:
    """What a shard's bytes depend on: samples, their files' sizes and mtimes, settings."""
    items = [[s.key, s.meta, file_stamps(s.files, task.src)] for s in task.samples]
    return shard_plan.plan_digest([FORMAT, task.dataset, task.method, task.tol_m, items])


def _items(task: BandShardTask) -> Iterator[Item]:
    """The task's samples read one by one, as the tar writer's items."""
    for sample in task.samples:
        try:
            arrays = read_sample(sample, task.method, task.tol_m)
        except (BadData, NotColocated) as exc:
            yield sample.key, [str(p) for p in sample.files], exc
            continue
        packed = sample_dict(sample, arrays, task.dataset, task.src, task.method)
        yield sample.key, [], Packed(packed, {"s1": arrays.s1, "s2": arrays.s2}, tuple(str(p) for _, p in sample.s1),
                                     arrays.offsets_m)


def write_band_shard(task: BandShardTask) -> dict[str, Any]:
    """Write one shard atomically (or keep a verified one), as `shard_writer.write_shard`."""
    return write_tar(task.out, task.name, task.index, _task_digest(task), _items(task),
                     {"s1": 2, "s2": task.s2_bands}, task.exclude_bad, task.encoding)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _patch_size(scan: BandScan) -> list[int] | None:
    """[H, W] of the output grid (the first readable sample's reference band); every sample's
    own size is in its JSON and checked by `shard verify`."""
    for sample in scan.samples:
        try:
            ref = max((band_info(p) for _, p in sample.s2), key=lambda i: i.height * i.width)
        except BandError:
            continue
        return [ref.height, ref.width]
    return None


def _count_limit(scan: BandScan, maxcount: int, maxsize: int | None) -> int:
    """`--maxsize` as a per-shard count, from the first sample's reference-band size."""
    if maxsize is None:
        return maxcount
    for sample in scan.samples:
        try:
            ref = max((band_info(p) for _, p in sample.s2), key=lambda i: i.height * i.width)
        except BandError:
            continue
        pixels = ref.height * ref.width
        size = 3 * 512 + 1024 + 2 * 128 + pixels * (4 * len(sample.s1) + 2 * len(sample.s2)) + 2 * 512
        fit = (maxsize - TAR_RECORD) // size
        if fit < 1:
            raise SatfuseError(f"--maxsize {maxsize} is smaller than one sample (~{size + TAR_RECORD} bytes); raise --maxsize")
        return min(maxcount, int(fit))
    return maxcount


def shard_bands(
    src: Path, spec: SourceDataset, out: Path, options: ScanOptions, *, maxcount: int = 1000,
    maxsize: int | None = None, workers: int = 1, seed: int = 0, shard_index: int | None = None,
    num_shards: int | None = None, overwrite: bool = False, exclude_bad: bool = False,
    command: list[str] | None = None, resample: str = DEFAULT_METHOD, tol_m: float | None = None,
    encoding: Encoding | None = None,
) -> dict[str, Any]:
    """Pack a `PER_BAND` dataset into `out` (`shard_writer.shard_dataset` checked `options`
    against `spec` already); returns the manifest (or the part manifest). `tol_m` defaults to
    `spec.colocation_tol_m`; `encoding` (`satfuse.data.format.codecs`) as for `shard_writer` (these
    sets have no label member)."""
    src, out = Path(src), named_out(out)
    encoding = encoding or Encoding()
    dataset, split_file = spec.name, options.split_file
    tol_m = spec.colocation_tol_m if tol_m is None else tol_m
    if resample not in METHODS:
        raise SatfuseError(f"--resample {resample!r}: use one of {list(METHODS)}")
    if not tol_m >= 0:
        raise SatfuseError(f"--colocation-tol-m {tol_m}: must be >= 0 metres")
    part = shard_plan.check_args(maxcount, maxsize, workers, shard_index, num_shards)
    check_paths(src, out)
    scan = spec.scan(src, options)
    if not isinstance(scan, BandScan):
        raise SatfuseError(f"dataset {dataset!r}: a {spec.kind} entry's scan must return a BandScan, got {type(scan).__name__}")
    if not scan.samples:
        reasons = "; ".join(e.reason for e in scan.excluded[: shard_plan.MAX_ERRORS_SHOWN])
        raise SatfuseError(f"{src}: no complete {dataset} pair to pack ({len(scan.excluded)} excluded: {reasons}); fix the layout or the split")
    if scan.ignored:
        first = ", ".join(i["path"] for i in scan.ignored[:3])
        log.warning("%s: %d file(s)/folder(s) not used (%s ...); listed in the manifest under 'ignored'", src, len(scan.ignored), first)
    count = _count_limit(scan, maxcount, maxsize)
    plan = shard_plan.plan_shards(scan.samples, seed, count)  # type: ignore[arg-type]  # any keyed list
    header = {
        "name": out.name, "dataset": dataset, "seed": seed, "maxcount": count, "label": None,
        "split_file": str(split_file) if split_file else None, "split": options.split, "planned_shards": len(plan),
        "planned_pairs": len(scan.samples), "bands": scan.bands,
        "dtype": {"s1": "float32", "s2": "uint16"},
        "resample": {"method": resample, "tolerance_m": tol_m, "grid": GRID_RULE},
        "patch_size": _patch_size(scan), "native_resolution_m": NATIVE_RESOLUTION_M,
        **scan.extras, "ignored": scan.ignored,
    }  # fmt: skip
    add_encoding(header, encoding)
    if encoding.s1_dtype != "float32":
        header["dtype"] = {**header["dtype"], "s1": encoding.s1_dtype}
    header["plan"] = shard_plan.plan_digest([header, [[s.key for s in shard] for shard in plan]])
    claim = prepare_out(out, overwrite, {"dataset": dataset})
    remove_stale(out, out.name, len(plan), part[0] if part else None)
    mine = [j for j in range(len(plan)) if part is None or j % part[1] == part[0]]
    s2_bands = len(scan.bands["s2"])
    tasks = [BandShardTask(j, out.name, out, src, dataset, plan[j], exclude_bad, resample, tol_m, s2_bands, encoding)
             for j in mine]
    records = shard_plan.run_tasks(write_band_shard, tasks, [len(t.samples) for t in tasks], workers)
    shard_plan.raise_on_errors(records, out)
    scan_excluded = [e.to_dict() for e in scan.excluded]
    command = command if command is not None else sys.argv
    if part is not None:
        return write_part(out, header, part, records, scan_excluded, command)
    manifest = build(header, records, scan_excluded, command)
    publish_or_discard(out, manifest, records, claim)
    return manifest
