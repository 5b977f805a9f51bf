"""Crop geometry for `satfuse bench io`: the pages a random crop touches in today's
row-major (C, H, W) `.npy` members against band-major square tiles, from the members' real
offsets in the tars; and the range-read prototype (a crop read as one pread per band).

Bench only: the shard format and the loader are unchanged (README: "Chunked layout")."""

from __future__ import annotations

import os
import tarfile
import time
from typing import Any

import numpy as np

from satfuse.bench.io_pagecache import PAGE, drop_cache, resident_pages


def npy_members(url: str, limit: int) -> list[list[tuple[int, int, tuple[int, ...], int]]]:
    """Per sample of `url` (first `limit`): the s1/s2 members as (data offset in the file,
    member size, (C, H, W) or () when not a plain .npy, itemsize)."""
    from satfuse.data.reading.stream_io import npy_layout, split_name  # lazy: --help stays fast

    samples: list[list[tuple[int, int, tuple[int, ...], int]]] = []
    last = None
    with open(url, "rb") as fh, tarfile.open(url, "r:") as tf:
        for info in tf:
            key, ext = split_name(info.name)
            if key != last:
                if len(samples) == limit:
                    break
                samples.append([])
                last = key
            if not ext.startswith(("s1.", "s2.")):
                continue
            shape: tuple[int, ...] = ()
            item = 1
            if ext in ("s1.npy", "s2.npy"):
                fh.seek(info.offset_data)
                shp, fortran, dtype, off = npy_layout(fh.read(min(info.size, 4096)))
                if len(shp) == 3 and not fortran:
                    samples[-1].append((info.offset_data + off, info.size - off, tuple(shp), dtype.itemsize))
                    continue
            samples[-1].append((info.offset_data, info.size, shape, item))
    return samples


def pages_rowmajor(start: int, shape: tuple[int, ...], item: int, top: int, left: int, c: int) -> set[int]:
    ch, h, w = shape
    pages: set[int] = set()
    for b in range(ch):
        for r in range(top, top + c):
            lo = start + ((b * h + r) * w + left) * item
            pages.update(range(lo // PAGE, (lo + c * item - 1) // PAGE + 1))
    return pages


def pages_tiled(shape: tuple[int, ...], item: int, tile: int, top: int, left: int, c: int) -> int:
    """Pages touched with each band stored as tile x tile blocks (row-major blocks, bands
    back to back, each band starting on a page)."""
    ch, h, w = shape
    tiles_x = -(-w // tile)
    band_bytes = -(-h // tile) * tiles_x * tile * tile * item
    band_pages = -(-band_bytes // PAGE)
    per_band: set[int] = set()
    tb = tile * tile * item
    for ty in range(top // tile, (top + c - 1) // tile + 1):
        for tx in range(left // tile, (left + c - 1) // tile + 1):
            lo = (ty * tiles_x + tx) * tb
            per_band.update(range(lo // PAGE, (lo + tb - 1) // PAGE + 1))
    return ch * min(len(per_band), band_pages)


def geometry(urls: list[str], crops: list[int], samples: int, tiles=(16, 32, 64), seed: int = 0) -> dict[str, Any]:
    """Mean pages (and bytes) per pair that a uniformly placed crop touches, today and tiled."""
    rng = np.random.default_rng(seed)
    members = [s for s in npy_members(urls[0], samples) if s]
    out: dict[str, Any] = {"samples": len(members), "page_bytes": PAGE, "crops": {}}
    for crop in crops:
        today, full, tiled = [], [], {t: [] for t in tiles}
        for sample in members:
            t_today = t_full = 0
            t_tiled = dict.fromkeys(tiles, 0)
            for start, size, shape, item in sample:
                whole = len(range(start // PAGE, (start + size - 1) // PAGE + 1))
                t_full += whole
                h = shape[1] if shape else 0
                c = crop or h
                if not shape or c >= h:  # not a plain .npy, or no crop: the whole member
                    t_today += whole
                    for t in tiles:
                        t_tiled[t] += whole if not shape else pages_tiled(shape, item, t, 0, 0, h)
                    continue
                top, left = (int(v) for v in rng.integers(0, h - c + 1, size=2))
                t_today += len(pages_rowmajor(start, shape, item, top, left, c))
                for t in tiles:
                    t_tiled[t] += pages_tiled(shape, item, t, top, left, c)
            today.append(t_today)
            full.append(t_full)
            for t in tiles:
                tiled[t].append(t_tiled[t])
        mean_full = float(np.mean(full))
        row = {"pages_full_patch": round(mean_full, 1), "pages_today": round(float(np.mean(today)), 1),
               "fraction_today": round(float(np.mean(today)) / mean_full, 3)}
        for t in tiles:
            row[f"pages_tiled_{t}"] = round(float(np.mean(tiled[t])), 1)
            row[f"fraction_tiled_{t}"] = round(float(np.mean(tiled[t])) / mean_full, 3)
        out["crops"][str(crop)] = row
    return out


def range_reads(urls: list[str], crops: list[int], limit: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """Bench-only prototype of reading a crop without a new layout: one pread per band of the
    crop's row range (rows are contiguous per band in today's (C, H, W) members), read-ahead
    off (POSIX_FADV_RANDOM), from a cold cache. Bytes by mincore, pairs/s from this disk.
    `limit`: the first pairs in shard order only (0: all)."""
    members: dict[str, list] = {}
    left = limit or 1 << 62
    for u in urls:  # headers are read before the drop
        if left <= 0:
            break
        members[u] = [s for s in npy_members(u, min(left, 1 << 30)) if s]
        left -= len(members[u])
    urls = list(members)
    rows = []
    for crop in crops:
        rng = np.random.default_rng(seed)
        for url in urls:
            drop_cache(url)
        before = sum(resident_pages(u) for u in urls)
        pairs, t0 = 0, time.perf_counter()
        for url in urls:
            fd = os.open(url, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                for sample in members[url]:
                    pairs += 1
                    for start, size, shape, item in sample:
                        h = shape[1] if shape else 0
                        if not shape or not crop or crop >= h:
                            os.pread(fd, size, start)
                            continue
                        w = shape[2]
                        top = int(rng.integers(0, h - crop + 1))
                        for b in range(shape[0]):
                            os.pread(fd, crop * w * item, start + (b * h + top) * w * item)
            finally:
                os.close(fd)
        seconds = time.perf_counter() - t0
        new = (sum(resident_pages(u) for u in urls) - before) * PAGE
        rows.append({"crop": crop, "cold_verified": before == 0, "pairs": pairs, "bytes_per_pair": round(new / max(1, pairs)),
                     "seconds": round(seconds, 4), "pairs_per_s": round(pairs / seconds, 1)})
    return rows
