"""Pack co-located S1/S2 GeoTIFF pairs into WebDataset shards (see shards/FORMAT.md).

Why shards: per-file datasets are slow on cluster filesystems (opening 540k GeoTIFFs per
epoch); a few hundred tars stream at disk speed. Why this much care: a shard set is the
input of every 100-GPU job after it, so it must be exactly reproducible, resumable after a
kill, splittable over a job array, and never half-written.

How, in short:
- the plan is a pure function of (sorted pairs, seed, per-shard count): a seeded global
  permutation cut into runs of `maxcount`; shard j = perm[j*maxcount:(j+1)*maxcount]. So a
  job-array part i that writes shards j % n == i produces exactly the single-run shards;
- each shard is written to `NAME-jjjjjj.tar.tmp`, fsynced, renamed, and then a sidecar
  record (`.satfuse/NAME-jjjjjj.tar.json`: plan digest, sha256, count, bytes, exact stats
  sums, exclusions) is written atomically. A rerun keeps a shard whose sidecar matches its
  plan and whose tar matches the sha256, and redoes the rest;
- the per-band stats are kept as sums: S2 (uint16) sums and sums of squares as exact
  integers, S1 (float32) as float64 sums combined in shard order, so a merge of job-array
  parts gives bit for bit the manifest of a single run;
- `manifest.json` is written last and atomically (a stale one is removed first), so its
  presence means "complete".

Bad input policy (documented in FORMAT.md): lone files and pairs that are not co-located
(CRS, transform, shape) are excluded and listed (exit 0). Data that cannot be trusted (an
unreadable/truncated .tif, wrong band count or dtype, NaN/Inf in S1) fails the run with
every bad file named and no manifest; `exclude_bad=True` lists those as excluded instead.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import queue
import re
import shutil
import sys
import tarfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import webdataset as wds
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from tqdm import tqdm

from satfuse.data.layout import (
    EXPECTED_BANDS,
    MAX_SHOWN,
    SOURCE_RULES,
    Excluded,
    Pair,
    scan_dataset,
)
from satfuse.utils import SatfuseError, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

FORMAT = "satfuse-shards/1"
PART_FORMAT = "satfuse-shards-part/1"
STATE_DIR = ".satfuse"  # sidecar records and the ownership marker
OWNER_FILE = "owner.json"
TAR_MTIME = 0.0  # fixed member mtime: identical input + seed -> identical bytes
TAR_RECORD = 10240  # tarfile pads the archive to a multiple of this
MAX_ERRORS_SHOWN = 5
BAND_DATASETS = ("ssl4eo-s12", "bigearthnet", "bigearthnet-v2")  # one GeoTIFF per band


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


def shard_name(name: str, index: int) -> str:
    """`NAME-000003.tar` (6 digits, the contract of the format)."""
    return f"{name}-{index:06d}.tar"


def plan_shards(pairs: list[Pair], seed: int, maxcount: int) -> list[list[Pair]]:
    """Seeded global permutation cut into shards of `maxcount` (the last may be shorter)."""
    perm = np.random.default_rng(seed).permutation(len(pairs))
    return [[pairs[i] for i in perm[j : j + maxcount]] for j in range(0, len(pairs), maxcount)]


def plan_digest(payload: Any) -> str:
    """sha256 of a canonical JSON rendering (plans and settings compare by this)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _rel(path: Path | None, src: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).relative_to(src))
    except ValueError:
        return str(path)


def _shard_plan_digest(pairs: list[Pair], src: Path, dataset: str, label: str | None) -> str:
    """What a shard's bytes depend on: the pairs, their files' sizes and mtimes, the format."""
    items = []
    for p in pairs:
        files = [f for f in (p.s1, p.s2, p.label, *(a for _, a in p.aux)) if f is not None]
        stats = []
        for f in files:
            try:
                st = f.stat()
                stats.append([_rel(f, src), st.st_size, st.st_mtime_ns])
            except OSError:
                stats.append([_rel(f, src), None, None])
        items.append([p.key, stats])
    return plan_digest([FORMAT, dataset, label, items])


def per_sample_bytes(pair: Pair) -> int:
    """Tar bytes of one sample, from the raster headers (all patches share the shape)."""
    total = 2 * 512 + 1024  # json member: header + (generous) body
    for path in (pair.s1, pair.s2, pair.label, *(a for _, a in pair.aux)):
        if path is None:
            continue
        with rasterio.open(path) as ds:
            data = 128 + ds.count * ds.height * ds.width * np.dtype(ds.dtypes[0]).itemsize
        total += 512 + math.ceil(data / 512) * 512
    return total


def count_limit(pairs: list[Pair], maxcount: int, maxsize: int | None) -> int:
    """`--maxsize` as a per-shard count: floor((maxsize - tar padding) / per-sample bytes).

    Why a count: shard boundaries must be a pure function of the plan for job arrays to
    equal a single run; the per-sample size is fixed by the (common) patch shape.
    """
    if maxsize is None:
        return maxcount
    for pair in pairs:
        try:
            size = per_sample_bytes(pair)
        except (RasterioError, OSError):
            continue
        fit = (maxsize - TAR_RECORD) // size
        if fit < 1:
            raise SatfuseError(f"--maxsize {maxsize} is smaller than one sample ({size + TAR_RECORD} bytes with tar padding, from {pair.s1}); raise --maxsize")
        return min(maxcount, int(fit))
    return maxcount


# --------------------------------------------------------------------------------------------
# Reading and checking one pair
# --------------------------------------------------------------------------------------------


class BadData(Exception):
    """A file that cannot be trusted (unreadable, wrong bands/dtype, NaN/Inf)."""


class NotColocated(Exception):
    """The files of a pair do not share CRS, transform and shape."""


@dataclass
class Raster:
    """A raster read straight into the bytes of its future `.npy` member (see npy_buffer)."""

    array: np.ndarray
    npy: np.ndarray  # uint8: .npy header + the array's bytes
    crs: Any  # rasterio CRS (None when the file has none)
    transform: tuple[float, ...]


def npy_buffer(shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 buffer holding an `.npy` header for (shape, dtype) followed by room for the
    data, and the array view of that room.

    Why: reading the raster directly into the member's bytes saves the two 2 MB copies of
    `np.save` per patch (copies cost ~1 ms each here); `np.empty` rather than `bytearray`
    skips zero-filling. The bytes equal `np.save`'s output (format 1.0, C order, no
    pickle); a test checks this.
    """
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    head = np.frombuffer(header.getvalue(), dtype=np.uint8)
    count = int(np.prod(shape))
    buf = np.empty(len(head) + count * dtype.itemsize, dtype=np.uint8)
    buf[: len(head)] = head
    return buf, buf[len(head) :].view(dtype).reshape(shape)


_OPEN_LOCK = threading.Lock()  # catch_warnings edits process-global filters: one reader thread at a time


def read_raster(path: Path, sensor: str) -> Raster:
    """Read one GeoTIFF, check it against SOURCE_RULES and convert it to the shard dtype.

    The band count must match and the dtype be one the rule allows; integer rasters stored
    in another dtype than the shard's (a uint16 lc, an int16 S2) are range-checked and
    converted, so the shards hold one dtype per member whatever the source used. BadData
    names the file.
    """
    rule = SOURCE_RULES[sensor]
    want_dtype = EXPECTED_BANDS[sensor][1]
    try:
        with _OPEN_LOCK, warnings.catch_warnings():  # a missing CRS is reported as an exclusion instead
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
        with ds:
            dtype = ds.dtypes[0]
            if ds.count != rule.bands or dtype not in rule.dtypes or len(set(ds.dtypes)) != 1:
                kinds = "an integer type" if len(rule.dtypes) > 2 else " or ".join(rule.dtypes)
                raise BadData(f"wrong bands: {path} has {ds.count} band(s) of {'/'.join(sorted(set(ds.dtypes)))}, a {sensor} patch needs {rule.bands} of {kinds}; regenerate it or remove the pair")
            buf, array = npy_buffer((ds.count, ds.height, ds.width), np.dtype(want_dtype))
            if dtype == want_dtype:
                ds.read(out=array)
                native = array
            else:
                native = ds.read()
            crs, transform = ds.crs, tuple(ds.transform)[:6]
    except RasterioError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        msg = str(cause).splitlines()[0] if str(cause) else exc.__class__.__name__
        raise BadData(f"unreadable: {path} is not a readable GeoTIFF (corrupt or truncated? {msg}); re-download or regenerate it") from None
    if rule.max_values is not None and (native.dtype != np.uint16 or sensor != "s2"):
        _check_range(path, sensor, native, rule.max_values)
    if native is not array:
        array[...] = native
    return Raster(array, buf, crs, transform)


def _check_range(path: Path, sensor: str, array: np.ndarray, max_values: tuple[int, ...]) -> None:
    """Integer values within [0, max] per band (a label outside its classes is not a label)."""
    flat = array.reshape(array.shape[0], -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    for band, (lo, hi, top) in enumerate(zip(low, high, max_values, strict=True)):
        if lo < 0 or hi > top:
            raise BadData(f"out of range: {path} band {band + 1} holds values {int(lo)}..{int(hi)}, a {sensor} patch allows 0..{top}; fix the file or remove the pair")


def read_pair(pair: Pair, label: str | None) -> dict[str, Raster]:
    """Read the files of a pair, check co-location and finiteness; raise BadData/NotColocated."""
    paths = {"s1": pair.s1, "s2": pair.s2}
    if label is not None and pair.label is not None:
        paths[label] = pair.label
    paths.update(pair.aux)
    rasters = {sensor: read_raster(path, sensor) for sensor, path in paths.items()}
    ref = rasters["s1"]
    for sensor, r in rasters.items():
        if not r.crs:
            raise NotColocated(f"not georeferenced: {paths[sensor]} has no CRS, so co-location cannot be checked; restore its georeferencing or remove the pair")
        if sensor != "s1" and (problems := _colocation_problems(r, ref)):
            raise NotColocated(f"not co-located: {sensor} differs from s1 in {'; '.join(problems)}")
    if not np.isfinite(ref.array).all():
        bad = int(np.count_nonzero(~np.isfinite(ref.array)))
        raise BadData(f"non-finite: {pair.s1} has {bad} NaN/Inf pixel(s); fill them or remove the pair")
    return rasters


def _colocation_problems(r: Raster, ref: Raster) -> list[str]:
    problems = []
    if r.array.shape[1:] != ref.array.shape[1:]:
        problems.append(f"shape {r.array.shape[1:]} vs {ref.array.shape[1:]}")
    if r.crs != ref.crs:
        problems.append(f"CRS {r.crs.to_string()} vs {ref.crs.to_string()}")
    if any(abs(a - b) > 1e-6 for a, b in zip(r.transform, ref.transform, strict=True)):
        problems.append(f"transform {r.transform} vs {ref.transform}")
    return problems


# --------------------------------------------------------------------------------------------
# Stats as exact, mergeable sums
# --------------------------------------------------------------------------------------------


def empty_sums(bands: int) -> dict[str, Any]:
    return {"sum": [0] * bands, "sumsq": [0] * bands, "min": [None] * bands, "max": [None] * bands, "count": 0}


def sample_sums(array: np.ndarray) -> dict[str, Any]:
    """Per-band sums of one (C, H, W) array: exact Python ints for integer rasters (uint64
    accumulation of uint32 squares), float64 sums for float rasters."""
    flat = array.reshape(array.shape[0], -1)
    if np.issubdtype(array.dtype, np.integer):
        wide = flat.astype(np.uint64 if flat.dtype.itemsize > 2 else np.uint32)
        sums = flat.sum(axis=1, dtype=np.uint64)
        wide *= wide
        sumsq = wide.sum(axis=1, dtype=np.uint64)
        conv: Any = int
    else:
        x = flat.astype(np.float64)
        sums, sumsq, conv = x.sum(axis=1), np.einsum("ij,ij->i", x, x), float
    return {
        "sum": [conv(v) for v in sums],
        "sumsq": [conv(v) for v in sumsq],
        "min": [conv(v) for v in flat.min(axis=1)],
        "max": [conv(v) for v in flat.max(axis=1)],
        "count": int(flat.shape[1]),
    }


def add_sums(acc: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """acc + other, in this order (float sums are combined in a fixed order everywhere)."""
    def pick(a: Any, b: Any, f: Any) -> Any:
        return b if a is None else a if b is None else f(a, b)

    return {
        "sum": [a + b for a, b in zip(acc["sum"], other["sum"], strict=True)],
        "sumsq": [a + b for a, b in zip(acc["sumsq"], other["sumsq"], strict=True)],
        "min": [pick(a, b, min) for a, b in zip(acc["min"], other["min"], strict=True)],
        "max": [pick(a, b, max) for a, b in zip(acc["max"], other["max"], strict=True)],
        "count": acc["count"] + other["count"],
    }


def finish_stats(sums: dict[str, Any]) -> dict[str, Any]:
    """Sums -> mean/std/min/max/count (population std)."""
    n = sums["count"]
    if n == 0:
        return {"mean": [], "std": [], "min": [], "max": [], "count": 0}
    mean = [s / n for s in sums["sum"]]
    std = [math.sqrt(max(sq / n - m * m, 0.0)) for sq, m in zip(sums["sumsq"], mean, strict=True)]
    return {"mean": mean, "std": std, "min": [float(v) for v in sums["min"]], "max": [float(v) for v in sums["max"]], "count": n}


# --------------------------------------------------------------------------------------------
# Writing one shard (runs in a worker process)
# --------------------------------------------------------------------------------------------


class AsyncHashingSink(io.RawIOBase):
    """A write-only file that hashes and writes on a background thread.

    Why: sha256 of a 2.4 MB sample costs ~2 ms here (no SHA extensions), as much as half of
    reading it; hashlib and file writes release the GIL, so doing both on a thread overlaps
    them with reading and encoding the next pair. The hash is of exactly the bytes written
    (no second read of the tar). `finish()` drains, fsyncs and re-raises any write error.
    """

    def __init__(self, fh: Any, depth: int = 64) -> None:
        super().__init__()
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="shard-sink", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data: Any) -> int:
        if self._error is not None:
            raise self._error
        block = data if isinstance(data, (bytes, memoryview)) else bytes(data)
        self._queue.put(block)  # memoryviews are of per-sample buffers that are never reused
        self.size += len(block)
        return len(block)

    def _drain(self) -> None:
        while (block := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.sha.update(block)
                    self.fh.write(block)
                except BaseException as exc:  # re-raised in the writing thread
                    self._error = exc

    def abort(self) -> None:
        """Stop the thread without fsync (the caller is discarding the file)."""
        self._error = self._error or RuntimeError("aborted")
        self._queue.put(None)
        self._thread.join()

    def finish(self) -> str:
        """Wait for every block, fsync, and return the sha256 hex digest."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self.fh.flush()
        os.fsync(self.fh.fileno())
        return self.sha.hexdigest()


class _ViewReader:
    """A read()-able view of a buffer that hands out memoryviews instead of copies."""

    def __init__(self, data: bytes | bytearray | np.ndarray) -> None:
        self.view, self.pos = memoryview(data), 0

    def read(self, size: int = -1) -> memoryview:
        end = len(self.view) if size < 0 else self.pos + size
        chunk = self.view[self.pos : end]
        self.pos += len(chunk)
        return chunk


class ShardTarWriter(wds.TarWriter):
    """webdataset's TarWriter, minus two copies per member.

    Why: TarWriter opens the tar in stream mode ('w|'), which pushes every member through
    10 KiB Python-level chunks, and wraps each value in a BytesIO (a copy for a bytearray).
    Here the tar is a regular USTAR TarFile that writes each member in one call from a
    memoryview. Members, names, order and TarInfo fields are exactly TarWriter's.
    """

    def __init__(self, fileobj: Any, **kwargs: Any) -> None:
        super().__init__(fileobj, **kwargs)  # its stream-mode TarFile has written nothing yet
        self.tarstream = tarfile.TarFile(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 26)

    def write(self, obj: dict[str, Any]) -> int:
        """TarWriter.write for a sample whose values are bytes-like (encoder=False)."""
        key, total = obj["__key__"], 0
        for ext in sorted(k for k in obj if not k.startswith("_")):
            data = obj[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(data), self.mode
            info.mtime = self.mtime if self.mtime is not None else time.time()
            info.uname, info.gname = self.user, self.group
            self.tarstream.addfile(info, _ViewReader(data))
            total += info.size
        return total


class Prefetcher:
    """Read pairs `depth` ahead on `threads` threads (rasterio releases the GIL while reading).

    Why two readers: reading is the critical path (~4 ms CPU per pair) while hashing and
    writing run on the sink thread; a second reader keeps both cores busy (measured +15%
    pairs/s on 2 cores). Results are consumed in plan order, so the shard bytes do not
    depend on which thread read which pair."""

    def __init__(self, pairs: list[Pair], label: str | None, depth: int = 4, threads: int = 2) -> None:
        self._pairs, self._label = pairs, label
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-read")
        self._depth = depth

    def _read(self, pair: Pair) -> dict[str, Raster] | Exception:
        try:
            return read_pair(pair, self._label)
        except (NotColocated, BadData) as exc:
            return exc

    def __iter__(self) -> Iterator[tuple[Pair, dict[str, Raster] | Exception]]:
        pending: deque[tuple[Pair, Future]] = deque()
        todo = iter(self._pairs)
        with self._pool:
            for pair in itertools.islice(todo, self._depth):
                pending.append((pair, self._pool.submit(self._read, pair)))
            while pending:
                pair, future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, self._pool.submit(self._read, nxt)))
                yield pair, future.result()


def sample_dict(pair: Pair, rasters: dict[str, Raster], dataset: str, src: Path) -> dict[str, Any]:
    """One WebDataset sample of the format: arrays as .npy, metadata as .json."""
    s1 = rasters["s1"]
    meta = {
        "key": pair.key, "dataset": dataset, "roi": pair.roi, "season": pair.season,
        "scene": pair.scene, "patch": pair.patch, "crs": s1.crs.to_string(), "transform": list(s1.transform),
        "height": int(s1.array.shape[1]), "width": int(s1.array.shape[2]),
        "sources": {sensor: _rel(_source(pair, sensor), src) for sensor in rasters},
    }  # fmt: skip
    sample: dict[str, Any] = {"__key__": pair.key, "json": json.dumps(meta).encode()}
    for sensor, r in rasters.items():
        sample[f"{sensor}.npy"] = r.npy
    return sample


def _source(pair: Pair, sensor: str) -> Path | None:
    if sensor in ("s1", "s2"):
        return getattr(pair, sensor)
    return dict(pair.aux).get(sensor, pair.label)


@dataclass
class ShardTask:
    """Everything a worker needs to write (or keep) one shard."""

    index: int
    name: str
    out: Path
    src: Path
    dataset: str
    label: str | None
    pairs: list[Pair]
    exclude_bad: bool


def sidecar_path(out: Path, tar_name: str) -> Path:
    return out / STATE_DIR / f"{tar_name}.json"


def _reusable(task: ShardTask, tar: Path, digest: str) -> dict[str, Any] | None:
    """The sidecar record if the shard on disk is exactly what this plan would write."""
    side = sidecar_path(task.out, tar.name)
    if not (side.is_file() and tar.is_file()):
        return None
    try:
        record = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if record.get("plan") != digest or record.get("bytes") != tar.stat().st_size:
        return None
    if sha256_file(tar) != record.get("sha256"):
        log.warning("%s: checksum differs from its record; rewriting it", tar)
        return None
    return record


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard atomically (or keep a verified one); return its record.

    A record with `errors` means data that cannot be trusted was found (strict mode): the
    temporary tar is removed and no sidecar is written, so nothing half-done looks complete.
    """
    tar = task.out / shard_name(task.name, task.index)
    digest = _shard_plan_digest(task.pairs, task.src, task.dataset, task.label)
    kept = _reusable(task, tar, digest)
    if kept is not None:
        return {**kept, "reused": True}
    tmp = tar.with_name(tar.name + ".tmp")
    sums = {"s1": empty_sums(2), "s2": empty_sums(13)}
    excluded: list[dict[str, Any]] = []
    errors: list[str] = []
    count = 0
    try:
        with open(tmp, "wb") as raw:
            sink = AsyncHashingSink(raw)
            try:
                writer = ShardTarWriter(sink, encoder=False, mtime=TAR_MTIME)
                for pair, rasters in Prefetcher(task.pairs, task.label):
                    if isinstance(rasters, Exception):
                        _exclude_or_fail(pair, rasters, task.exclude_bad, excluded, errors)
                        continue
                    writer.write(sample_dict(pair, rasters, task.dataset, task.src))
                    for sensor in ("s1", "s2"):
                        sums[sensor] = add_sums(sums[sensor], sample_sums(rasters[sensor].array))
                    count += 1
                writer.close()
            except BaseException:
                sink.abort()
                raise
            sha = sink.finish()
        if errors:
            tmp.unlink(missing_ok=True)
            return {"index": task.index, "name": tar.name, "errors": errors}
        os.replace(tmp, tar)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record = {
        "index": task.index, "name": tar.name, "plan": digest, "count": count,
        "bytes": sink.size, "sha256": sha, "sums": sums, "excluded": excluded,
    }  # fmt: skip
    try:
        atomic_write_text(sidecar_path(task.out, tar.name), json.dumps(record))
    except OSError:
        tar.unlink(missing_ok=True)  # a tar without its record would only look finished
        raise
    return {**record, "reused": False}


def _exclude_or_fail(pair: Pair, exc: Exception, exclude_bad: bool, excluded: list[dict[str, Any]], errors: list[str]) -> None:
    """Co-location problems are exclusions; bad data is an error unless `exclude_bad`."""
    paths = [str(p) for p in (pair.s1, pair.s2, pair.label, *(a for _, a in pair.aux)) if p is not None]
    if isinstance(exc, NotColocated) or exclude_bad:
        excluded.append(Excluded(pair.key, str(exc), paths).to_dict())
    else:
        errors.append(f"{pair.key}: {exc}")


# --------------------------------------------------------------------------------------------
# Output directory: ownership, stale files
# --------------------------------------------------------------------------------------------


def _check_paths(src: Path, out: Path) -> None:
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise SatfuseError(f"{out}: output is inside the source {src}; write shards outside the dataset tree (e.g. shards/NAME)")
    if o in s.parents:
        raise SatfuseError(f"{out}: output contains the source {src}; choose an output directory outside it")
    if out.exists() and not out.is_dir():
        raise SatfuseError(f"{out}: exists and is not a directory; choose another --out")


def _prepare_out(out: Path, overwrite: bool, settings: dict[str, Any]) -> None:
    """Claim the output directory: refuse someone else's non-empty dir, or one holding
    another shard set (another dataset, or tars of another name), unless `overwrite`, which
    empties it first so no old tar is left behind for a glob to pick up."""
    marker = out / STATE_DIR / OWNER_FILE
    if out.is_dir() and not overwrite:
        if not marker.is_file() and not _only_our_files(out):
            raise SatfuseError(f"{out}: not empty and not a satfuse shard directory; choose an empty --out or pass --overwrite to replace its contents")
        if (other := _other_shard_set(out, settings)) is not None:
            raise SatfuseError(f"{out}: holds another shard set ({other}); choose another --out or pass --overwrite to replace it")
    if overwrite and out.is_dir() and any(out.iterdir()):
        log.warning("%s: --overwrite: removing its contents", out)
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_write_text(marker, json.dumps({"format": FORMAT, "name": out.name, **settings}, indent=1))


def _other_shard_set(out: Path, settings: dict[str, Any]) -> str | None:
    """What says `out` holds a shard set other than the one about to be written, or None."""
    marker = out / STATE_DIR / OWNER_FILE
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("dataset", settings["dataset"]) != settings["dataset"]:
            return f"dataset {owner.get('dataset')!r} per {marker}, this run packs {settings['dataset']!r}"
        if owner.get("name", out.name) != out.name:
            return f"name {owner.get('name')!r} per {marker}"
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, ValueError):
            doc = {}
        if doc.get("dataset", settings["dataset"]) != settings["dataset"] or doc.get("name", out.name) != out.name:
            return f"{doc.get('dataset')!r} shards named {doc.get('name')!r} per {manifest}"
    ours = re.compile(rf"^{re.escape(out.name)}-\d{{6}}\.tar(\.tmp)?$")
    strays = sorted(p.name for p in out.glob("*.tar*") if not ours.match(p.name))
    if strays:
        return f"tars of another name: {', '.join(strays[:MAX_SHOWN])}{' ...' if len(strays) > MAX_SHOWN else ''}"
    return None


def _only_our_files(out: Path) -> bool:
    """True for an empty dir or one holding only what this tool writes (a job-array part
    may look while another part has created `.satfuse/` but not yet its marker)."""
    name = re.escape(out.name)
    ours = re.compile(rf"^(\.satfuse|manifest\.json|manifest\.part-\d+-of-\d+\.json|{name}-\d{{6}}\.tar(\.tmp)?)$")
    return all(ours.match(child.name) for child in out.iterdir())


def _remove_stale(out: Path, name: str, num_planned: int, part: int | None) -> None:
    """Before writing: a stale manifest must not describe a changing directory; shards past
    the new plan (from an older, larger run) must not be picked up by a glob."""
    (out / "manifest.json").unlink(missing_ok=True)
    if part is None:
        for p in out.glob("manifest.part-*-of-*.json"):
            p.unlink()
    for tar in out.glob(f"{name}-*.tar"):
        stem = tar.name[len(name) + 1 : -4]
        if stem.isdigit() and int(stem) >= num_planned:
            tar.unlink(missing_ok=True)
            sidecar_path(out, tar.name).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def publish_text(path: Path, text: str) -> None:
    """Atomic write, then world-readable: a shard set is shared by every job of a cluster
    (atomic_write_text's temp file is created 0600)."""
    atomic_write_text(path, text)
    os.chmod(path, 0o644)


def versions() -> dict[str, str]:
    from satfuse import __version__

    return {
        "satfuse": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__,
        "webdataset": getattr(wds, "__version__", "unknown"),
    }  # fmt: skip


def build_manifest(header: dict[str, Any], records: list[dict[str, Any]], scan_excluded: list[dict[str, Any]], command: list[str], ignored: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest of a complete shard set, from records in shard-index order.

    Single runs and merges both come through here with records sorted by index, so their
    manifests are equal except for `created` and `command`.
    """
    records = sorted(records, key=lambda r: r["index"])
    bands = header.get("bands") or {"s1": [None] * 2, "s2": [None] * 13}  # per-band datasets record names
    sums = {sensor: empty_sums(len(names)) for sensor, names in bands.items()}
    excluded = list(scan_excluded)
    for r in records:
        for sensor in sums:
            sums[sensor] = add_sums(sums[sensor], r["sums"][sensor])
        excluded.extend(r["excluded"])
    excluded.sort(key=lambda e: (e["key"], e["reason"]))
    return {
        "format": FORMAT,
        **header,
        "shards": [{"name": r["name"], "count": r["count"], "bytes": r["bytes"], "sha256": r["sha256"]} for r in records],
        "total_samples": sum(r["count"] for r in records),
        "excluded": excluded,
        "ignored": list(ignored if ignored is not None else header.get("ignored", [])),
        "stats": {sensor: finish_stats(s) for sensor, s in sums.items()},
        "command": command,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def shard_dataset(
    src: Path,
    dataset: str,
    out: Path,
    maxcount: int = 1000,
    maxsize: int | None = None,
    workers: int = 1,
    seed: int = 0,
    split_file: Path | None = None,
    shard_index: int | None = None,
    num_shards: int | None = None,
    overwrite: bool = False,
    exclude_bad: bool = False,
    command: list[str] | None = None,
    exclude_scenes: Path | None = None,
    pairs_file: Path | None = None,
    strict_split: bool = False,
    **band_options: Any,
) -> dict[str, Any]:
    """Pack `src` into `out` (see module doc). Returns the manifest (or, for a job-array
    part, the part manifest). `num_shards` is the number of job-array parts, not of tars.
    `strict_split` makes split-list entries without files fatal (they are listed otherwise).
    `band_options` (resample, s2_level, split, tol_m, max_gap_days) are for BAND_DATASETS."""
    src, out = Path(src), Path(out)
    if dataset in BAND_DATASETS:  # one file per band: SSL4EO-S12, BigEarthNet (satfuse.data.multiband)
        unused = [flag for flag, value in (("--exclude-scenes", exclude_scenes), ("--pairs-file", pairs_file),
                                           ("--strict-split", strict_split)) if value]
        if unused:
            raise SatfuseError(f"{', '.join(unused)}: not used by --dataset {dataset} (SEN12MS/DFC2020/pairs only); drop it")
        from satfuse.data.multiband import shard_bands

        return shard_bands(src, dataset, out, maxcount=maxcount, maxsize=maxsize, workers=workers, seed=seed,
                           split_file=split_file, shard_index=shard_index, num_shards=num_shards,
                           overwrite=overwrite, exclude_bad=exclude_bad, command=command, **band_options)
    part = _check_args(maxcount, maxsize, workers, shard_index, num_shards)
    _check_paths(src, out)
    result = scan_dataset(src, dataset, split_file, exclude_scenes, pairs_file)
    _report_scan(result, src, split_file, strict_split)
    if not result.pairs:
        reasons = "; ".join(e.reason for e in result.excluded[:MAX_ERRORS_SHOWN])
        raise SatfuseError(f"{src}: no complete {dataset} pair to pack ({len(result.excluded)} excluded: {reasons}); fix the layout or --split-file")
    count = count_limit(result.pairs, maxcount, maxsize)
    plan = plan_shards(result.pairs, seed, count)
    header = {
        "name": out.name, "dataset": dataset, "seed": seed, "maxcount": count, "label": result.label,
        "split_file": str(split_file) if split_file else None, "planned_shards": len(plan),
        "planned_pairs": len(result.pairs),
    }  # fmt: skip
    if result.aux:
        header["aux"] = list(result.aux)  # further members of every sample (DFC2020 lc)
    if exclude_scenes is not None:
        header["exclude_scenes"] = str(exclude_scenes)
    if pairs_file is not None:
        header["pairs_file"] = str(pairs_file)
    header["plan"] = plan_digest([header, [[p.key for p in shard] for shard in plan]])
    _prepare_out(out, overwrite, {"dataset": dataset})
    _remove_stale(out, out.name, len(plan), part[0] if part else None)
    mine = [j for j in range(len(plan)) if part is None or j % part[1] == part[0]]
    tasks = [ShardTask(j, out.name, out, src, dataset, result.label, plan[j], exclude_bad) for j in mine]
    try:
        records = _run_tasks(tasks, workers)
        _raise_on_errors(records, out)
        scan_excluded = [e.to_dict() for e in result.excluded]
        ignored = [i.to_dict() for i in result.ignored]
        command = command if command is not None else sys.argv
        if part is not None:
            return _write_part(out, header, part, records, scan_excluded, command, ignored)
        manifest = build_manifest(header, records, scan_excluded, command, ignored)
        publish_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    except OSError as exc:
        from satfuse.diskspace import is_no_space, no_space_error

        if not is_no_space(exc):
            raise
        # what the unfinished shards still need (finished ones are kept and reused on rerun)
        needed = sum(_shard_bytes(t) for t in tasks if not (out / shard_name(t.name, t.index)).is_file())
        raise no_space_error(out, needed, "writing shards",
                             "free space there (or pass another --out) and rerun the same command: "
                             "finished shards are kept, no manifest was written") from None
    return manifest


def _shard_bytes(task: ShardTask) -> int:
    """Estimated tar size of one shard (the rasters' headers; 0 when unreadable)."""
    try:
        return TAR_RECORD + sum(per_sample_bytes(p) for p in task.pairs[:1]) * len(task.pairs)
    except (RasterioError, OSError):
        return 0


def _report_scan(result: Any, src: Path, split_file: Path | None, strict_split: bool) -> None:
    """Say what the scan will not pack: split entries without files, unused files/folders."""
    if result.missing:
        first = ", ".join(result.missing[:MAX_SHOWN])
        more = f" (+{len(result.missing) - MAX_SHOWN} more)" if len(result.missing) > MAX_SHOWN else ""
        msg = f"{split_file}: {len(result.missing)} listed patch(es) have no files under {src}: {first}{more}"
        if strict_split:
            raise SatfuseError(f"{msg}; --strict-split makes this fatal: fix --src or the list, or drop --strict-split to pack the rest")
        log.warning("%s; the full list is in manifest.json (excluded, kind `missing`); --strict-split makes this fatal", msg)
    if result.not_listed:
        log.info("%s: %d patch(es) on disk are not in %s and are not packed (the split's choice)", src, result.not_listed, split_file)
    if result.ignored:
        first = ", ".join(i.path for i in result.ignored[:MAX_SHOWN])
        log.info("%s: %d file(s)/folder(s) not used (%s%s); listed with reasons in manifest.json `ignored`", src, len(result.ignored), first, " ..." if len(result.ignored) > MAX_SHOWN else "")


def _check_args(maxcount: int, maxsize: int | None, workers: int, shard_index: int | None, num_shards: int | None) -> tuple[int, int] | None:
    if maxcount < 1:
        raise SatfuseError(f"--maxcount {maxcount}: must be at least 1")
    if maxsize is not None and maxsize < 1:
        raise SatfuseError(f"--maxsize {maxsize}: must be a positive number of bytes")
    if workers < 1:
        raise SatfuseError(f"--workers {workers}: must be at least 1")
    if shard_index is None and num_shards is None:
        return None
    if shard_index is None or num_shards is None:
        raise SatfuseError("cluster mode needs both --shard-index and --num-shards (or SLURM_ARRAY_TASK_ID/COUNT)")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise SatfuseError(f"--shard-index {shard_index} --num-shards {num_shards}: need 0 <= index < num-shards")
    return shard_index, num_shards


def _run_tasks(tasks: list[ShardTask], workers: int) -> list[dict[str, Any]]:
    """Write shards in-process (1 worker) or over a process pool, one shard per task.

    The pool forks where the platform allows (webdataset imports torch: ~2-4 s per spawned
    worker otherwise) and is created before the progress bar starts its monitor thread.
    """
    total = sum(len(t.pairs) for t in tasks)
    if workers == 1 or len(tasks) <= 1:
        with _bar(total) as bar:
            records = []
            for task in tasks:
                records.append(write_shard(task))
                bar.update(len(task.pairs))
        return records
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    sizes = {t.index: len(t.pairs) for t in tasks}
    with mp.get_context(method).Pool(min(workers, len(tasks)), initializer=quiet_gdal) as pool, _bar(total) as bar:
        records = []
        for record in pool.imap_unordered(write_shard, tasks):
            records.append(record)
            bar.update(sizes[record["index"]])
    return sorted(records, key=lambda r: r["index"])


def _bar(total: int) -> tqdm:
    return tqdm(total=total, desc="shard", unit="pair", disable=not sys.stderr.isatty())


def quiet_gdal() -> None:
    """GDAL reports a corrupt file as a burst of warnings; the packer reports each bad file
    once with the fix, so only GDAL's errors are worth showing (also run in pool workers)."""
    for name in ("rasterio._env", "rasterio._err", "rasterio._io"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _raise_on_errors(records: list[dict[str, Any]], out: Path) -> None:
    errors = [e for r in records for e in r.get("errors", [])]
    if not errors:
        return
    for e in errors:
        log.error("%s", e)
    shown = " | ".join(errors[:MAX_ERRORS_SHOWN])
    more = f" (+{len(errors) - MAX_ERRORS_SHOWN} more, see the log)" if len(errors) > MAX_ERRORS_SHOWN else ""
    raise SatfuseError(
        f"{out}: {len(errors)} pair(s) with data that cannot be trusted, no manifest written: {shown}{more}; "
        "fix or remove those files, or rerun with --exclude-bad to list them as excluded (finished shards are kept and reused)"
    )


def part_path(out: Path, index: int, num: int) -> Path:
    return out / f"manifest.part-{index}-of-{num}.json"


def _write_part(out: Path, header: dict[str, Any], part: tuple[int, int], records: list[dict[str, Any]], scan_excluded: list[dict[str, Any]], command: list[str], ignored: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    doc = {
        "format": PART_FORMAT, "header": header, "part": part[0], "num_parts": part[1],
        "records": [{k: v for k, v in r.items() if k != "reused"} for r in records],
        "scan_excluded": scan_excluded, "scan_ignored": list(ignored or []), "command": command,
    }  # fmt: skip
    publish_text(part_path(out, *part), json.dumps(doc) + "\n")
    return doc


def merge(out: Path, command: list[str] | None = None) -> dict[str, Any]:
    """Join the part manifests of a job-array run into `manifest.json` (all parts needed)."""
    out = Path(out)
    parts = sorted(out.glob("manifest.part-*-of-*.json"))
    if not parts:
        raise SatfuseError(f"{out}: no manifest.part-*-of-*.json found; run `satfuse shard ... --shard-index i --num-shards n` for every part first")
    docs = [_read_part(p) for p in parts]
    nums = {d["num_parts"] for d in docs}
    if len(nums) != 1:
        raise SatfuseError(f"{out}: part manifests of different job arrays ({sorted(nums)} parts); remove the stale ones and rerun the missing parts")
    num = nums.pop()
    have = {d["part"]: d for d in docs}
    for i in range(num):
        if i not in have:
            raise SatfuseError(f"{out}: part {i} of {num} is missing ({part_path(out, i, num).name}); rerun `satfuse shard ... --shard-index {i} --num-shards {num}`")
    header = have[0]["header"]
    for i, d in have.items():
        if d["header"] != header:
            raise SatfuseError(f"{part_path(out, i, num)}: written with other settings or source than part 0; rerun every part with the same arguments")
    records = sorted((r for d in have.values() for r in d["records"]), key=lambda r: r["index"])
    _check_records(out, records, header["planned_shards"])
    manifest = build_manifest(header, records, have[0]["scan_excluded"], command if command is not None else sys.argv, have[0].get("scan_ignored", []))
    manifest["part_commands"] = [have[i]["command"] for i in range(num)]
    publish_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def _read_part(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SatfuseError(f"{path}: unreadable part manifest ({exc.__class__.__name__}); rerun that part") from None
    if doc.get("format") != PART_FORMAT:
        raise SatfuseError(f"{path}: not a satfuse part manifest (format {doc.get('format')!r}); remove it")
    return doc


def _check_records(out: Path, records: list[dict[str, Any]], planned: int) -> None:
    indices = [r["index"] for r in records]
    if indices != list(range(planned)):
        raise SatfuseError(f"{out}: parts cover shards {indices[:10]}..., the plan has {planned}; rerun every part with the same arguments")
    for r in records:
        tar = out / r["name"]
        if not tar.is_file() or tar.stat().st_size != r["bytes"]:
            raise SatfuseError(f"{tar}: missing or of the wrong size for its part record; rerun the part that wrote it")


def summary(manifest: dict[str, Any]) -> str:
    """One line for the log: packed, shards, exclusions by kind."""
    kinds: dict[str, int] = {}
    for e in manifest["excluded"]:
        kind = e["reason"].split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    ignored = len(manifest.get("ignored", []))
    return f"packed {manifest['total_samples']} pairs into {len(manifest['shards'])} shards; excluded {len(manifest['excluded'])} ({by_kind}); ignored {ignored} file(s)/folder(s) not in the layout"
