"""Streaming loader throughput (samples/s) vs per-file rasterio reads of the same pairs vs
the raw tar-bytes floor, measured in one run.

Why these three: per-file GeoTIFF reads are what a plain EO dataset class does (the
reference the shards must beat: goal >= 5x); reading the tar bytes without decoding is the
floor no loader can beat on this disk. The loader rows do *more* work than the reference
(decode, crop, clip + normalise, batch, DataLoader transfer), the reference only reads the
two rasters. Every row reads from the page cache (the data were just written), so the
ratios compare CPU cost, not disk speed; on a cluster filesystem per-file opens cost more.
"""

from __future__ import annotations

import argparse
import logging
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from satfuse.config import DataConfig

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", default="", help="an existing shard dir (default: synthesise one)")
    p.add_argument("--raw", default="", help="the SEN12MS tree the shards came from (per-file reference)")
    p.add_argument("--scenes", type=int, default=4, help="synthetic scenes (when synthesising)")
    p.add_argument("--patches", type=int, default=32, help="synthetic patches per scene")
    p.add_argument("--size", type=int, default=256, help="synthetic patch size (SEN12MS: 256)")
    p.add_argument("--maxcount", type=int, default=16, help="samples per shard (when synthesising)")
    p.add_argument("--workers", nargs="*", type=int, default=[0, 2], help="loader num_workers rows")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crops", nargs="*", type=int, default=[0, 128], help="loader crop rows (0 = full patch)")
    p.add_argument("--repeats", type=int, default=2, help="best of N for each row")


def synthesise(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from satfuse.data.shard_writer import shard_dataset
    from satfuse.data.synth import write_sen12ms

    raw, shards = workdir / "raw", workdir / "shards" / "bench"
    write_sen12ms(raw, scenes=args.scenes, patches_per_scene=args.patches, seed=0, size=args.size)
    shard_dataset(raw, "sen12ms", shards, maxcount=args.maxcount, seed=0, command=["bench", "loader"])
    return raw, shards


def per_file_reads(raw: Path) -> tuple[float, int]:
    """Reference: open and read both GeoTIFFs of every pair with rasterio."""
    import rasterio

    from satfuse.data.layout import scan

    pairs = scan(raw, "sen12ms").pairs
    t0 = time.perf_counter()
    for pair in pairs:
        for path in (pair.s1, pair.s2):
            with rasterio.open(path) as src:
                src.read()
    return time.perf_counter() - t0, len(pairs)


def raw_tar_bytes(urls: list[str]) -> tuple[float, int]:
    """Floor: read every member's bytes of every shard, decode nothing."""
    t0 = time.perf_counter()
    keys = set()
    for url in urls:
        with tarfile.open(url, "r:") as tf:
            for info in tf:
                fh = tf.extractfile(info)
                if fh is not None:
                    fh.read()
                    keys.add(info.name.split(".", 1)[0])
    return time.perf_counter() - t0, len(keys)


def loader_epoch(shards, workers: int, batch: int, crop: int) -> tuple[float, int]:
    """One epoch of PretrainLoader on 1 rank, worker start-up included."""
    from satfuse.data.reader import PretrainLoader

    cfg = DataConfig(batch_size=batch, num_workers=workers, shuffle_buffer=64, crop=crop)
    ld = PretrainLoader(shards, cfg, rank=0, world_size=1, seed=0)
    t0 = time.perf_counter()
    it = iter(ld)
    n = sum(len(next(it)["key"]) for _ in range(ld.steps_per_epoch))
    elapsed = time.perf_counter() - t0
    del it
    return elapsed, n


def best(fn, repeats: int) -> tuple[float, int]:
    runs = [fn() for _ in range(max(1, repeats))]
    return min(r[0] for r in runs), runs[0][1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from satfuse.data.reader import resolve_shards

    with tempfile.TemporaryDirectory(prefix="satfuse-bench-loader-") as tmp:
        if args.shards:
            shard_dir, raw = Path(args.shards), Path(args.raw) if args.raw else None
        else:
            raw, shard_dir = synthesise(Path(tmp), args)
        shards = resolve_shards(str(shard_dir))
        rows: dict[str, dict[str, Any]] = {}
        if raw is not None:
            rows["per_file_rasterio"] = row(*best(lambda: per_file_reads(raw), args.repeats))
        rows["raw_tar_bytes"] = row(*best(lambda: raw_tar_bytes(shards.urls), args.repeats))
        for crop in args.crops:
            for workers in args.workers:
                t, n = best(lambda w=workers, c=crop: loader_epoch(shards, w, args.batch, c), args.repeats)
                rows[f"loader_w{workers}_crop{crop}"] = row(t, n)
        ref = rows.get("per_file_rasterio", {}).get("samples_per_s")
        floor = rows["raw_tar_bytes"]["samples_per_s"]
        for r in rows.values():
            r["x_per_file"] = round(r["samples_per_s"] / ref, 2) if ref else None
            r["fraction_of_floor"] = round(r["samples_per_s"] / floor, 3)
        return {
            "samples": shards.total, "shards": len(shards.urls), "patch": args.size if not args.shards else None,
            "batch": args.batch, "rows": rows,
            "note": "per_file_rasterio reads both rasters only; loader rows also decode, crop, normalise and batch",
        }


def row(seconds: float, samples: int) -> dict[str, Any]:
    return {"seconds": round(seconds, 4), "samples": samples, "samples_per_s": round(samples / seconds, 1)}
