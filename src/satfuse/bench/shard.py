"""`satfuse bench shard`: what packing costs on top of the I/O it cannot avoid.

Two references, measured in the same run on the same synthetic files (page cache warm: a
read pass runs first), alternating with the packer, best of `--repeats` each:
- read only: rasterio reads every file of every pair (the reader path the packer uses);
- the I/O floor: that read, plus writing as many bytes as the packer wrote, durably, to the
  same filesystem: one file per shard of the same size, written in 4 MiB blocks and fsynced
  (the packer must fsync each shard before its rename). floor = read time + write time.
Everything else (checks, stats, .npy encoding, tar framing, sha256) is overhead we own.
Goal: packing <= 1.3x the I/O floor (wall); the read-only ratio stays reported. The
`*_median` ratios are medians of per-round ratios (robust to a neighbour's burst).

The packer overlaps reading (a prefetch thread) and hashing/writing (a sink thread) with
encoding, so its wall time can approach the read time on 2 cores while it spends more CPU;
the CPU-time ratio is reported beside the wall-time ratio so neither hides the other.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import rasterio

from satfuse.data.packing.normalize import sample_sums
from satfuse.data.packing.raster import read_pair
from satfuse.data.packing.shard_writer import shard_dataset
from satfuse.data.sources.layout import Pair
from satfuse.data.sources.synth import write_sen12ms
from satfuse.data.sources.tree_scan import scan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=200, help="synthetic pairs to pack")
    parser.add_argument("--size", type=int, default=256, help="patch size (real data: 256)")
    parser.add_argument("--maxcount", type=int, default=50, help="samples per shard")
    parser.add_argument("--workers", type=int, default=1, help="sharding worker processes")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each side")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the temporary data (default: system temp)")


def read_all(pairs: list[Pair]) -> int:
    """The reference: open and read every file of every pair with rasterio, nothing else."""
    n = 0
    for pair in pairs:
        for path in (pair.s1, pair.s2, pair.label):
            if path is not None:
                with rasterio.open(path) as ds:
                    ds.read()
        n += 1
    return n


def write_floor(sizes: list[int], out: Path) -> None:
    """The durable-write half of the floor: one file per size in `out`, 4 MiB writes, fsync."""
    out.mkdir()
    block = memoryview(os.urandom(4 << 20))
    for i, size in enumerate(sizes):
        with open(out / f"floor-{i:06d}.bin", "wb") as fh:
            left = size
            while left:
                left -= fh.write(block[: min(left, len(block))])
            fh.flush()
            os.fsync(fh.fileno())


def stage_ms(pairs: list[Pair], label: str | None) -> dict[str, float]:
    """CPU ms per pair of each stage of packing, each run alone on one thread over `pairs`
    (what the packer spends besides the floor; its threads overlap them in wall time)."""
    def per_pair(fn: Any) -> float:
        t0 = time.thread_time()
        for item in items:
            fn(item)
        return 1e3 * (time.thread_time() - t0) / len(pairs)

    items = list(pairs)
    ms = {"read_raw": per_pair(lambda p: read_all([p]))}
    ms["read_and_check"] = per_pair(lambda p: read_pair(p, label))
    items = [read_pair(p, label) for p in pairs]
    ms["stats_sums"] = per_pair(lambda r: [sample_sums(r[s].array) for s in ("s1", "s2")])
    ms["sha256"] = per_pair(lambda r: [hashlib.sha256(r[s].npy).digest() for s in r])
    return {k: round(v, 3) for k, v in ms.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="satfuse-bench-shard-") as tmp:
        root = Path(tmp)
        per_scene = min(args.pairs, 25)
        scenes = math.ceil(args.pairs / per_scene)
        n = write_sen12ms(root / "src", scenes, per_scene, seed=0, size=args.size)
        scanned = scan(root / "src", "sen12ms")
        pairs = scanned.pairs
        read_all(pairs)  # warm the page cache for both sides
        read_s = shard_s = write_s = read_cpu = shard_cpu = math.inf
        rounds: list[tuple[float, float, float]] = []
        sizes: list[int] = []
        for r in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            read_all(pairs)
            read_r, read_cpu = time.perf_counter() - t0, min(read_cpu, time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            shard_dataset(root / "src", "sen12ms", root / f"out{r}", maxcount=args.maxcount, workers=args.workers, command=["bench"])
            shard_r, shard_cpu = time.perf_counter() - t0, min(shard_cpu, time.process_time() - c0)
            sizes = [p.stat().st_size for p in sorted((root / f"out{r}").glob("*.tar"))]
            shutil.rmtree(root / f"out{r}")
            t0 = time.perf_counter()
            write_floor(sizes, root / f"floor{r}")
            write_r = time.perf_counter() - t0
            shutil.rmtree(root / f"floor{r}")
            rounds.append((read_r, write_r, shard_r))
            read_s, write_s, shard_s = min(read_s, read_r), min(write_s, write_r), min(shard_s, shard_r)
        stages = stage_ms(pairs, scanned.label)
    ratio = shard_s / read_s
    floor_s = read_s + write_s
    return {
        "bench": "shard",
        "pairs": n,
        "size": args.size,
        "workers": args.workers,
        "maxcount": args.maxcount,
        "read_pairs_per_s": n / read_s,
        "shard_pairs_per_s": n / shard_s,
        "shard_over_read_time": ratio,
        "shard_over_read_cpu": shard_cpu / read_cpu if args.workers == 1 else None,
        "overhead_pct": 100.0 * (ratio - 1.0),
        "bytes_written": sum(sizes),
        "read_s": read_s,
        "write_fsync_s": write_s,
        "floor_s": floor_s,
        "shard_s": shard_s,
        "shard_over_floor_time": shard_s / floor_s,
        "shard_over_floor_time_median": statistics.median(s / (r + w) for r, w, s in rounds),
        "goal_over_floor": 1.3,
        "meets_goal": shard_s / floor_s <= 1.3,
        "stage_cpu_ms_per_pair": stages,
        "write_fsync_ms_per_pair": 1e3 * write_s / n,
    }
