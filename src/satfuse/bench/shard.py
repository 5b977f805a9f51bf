"""`satfuse bench shard`: what packing costs on top of merely reading the GeoTIFFs.

Why this reference: reading the rasters is the floor of any sharding tool; everything else
(checks, stats, .npy encoding, tar writing, sha256, fsync) is overhead we own. Both are
measured in the same run on the same synthetic files (page cache warm for both: a read
pass runs first), alternating, best of `--repeats`. Goal: packing < 1.3x reading (wall).

The packer overlaps reading (a prefetch thread) and hashing/writing (a sink thread) with
encoding, so its wall time can approach the read time on 2 cores while it spends more CPU;
the CPU-time ratio is reported beside the wall-time ratio so neither hides the other.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import rasterio

from satfuse.data.layout import Pair
from satfuse.data.shard_writer import shard_dataset
from satfuse.data.synth import write_sen12ms
from satfuse.data.tree_scan import scan


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="satfuse-bench-shard-") as tmp:
        root = Path(tmp)
        per_scene = min(args.pairs, 25)
        scenes = math.ceil(args.pairs / per_scene)
        n = write_sen12ms(root / "src", scenes, per_scene, seed=0, size=args.size)
        pairs = scan(root / "src", "sen12ms").pairs
        read_all(pairs)  # warm the page cache for both sides
        read_s = shard_s = read_cpu = shard_cpu = math.inf
        for r in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            read_all(pairs)
            read_s, read_cpu = min(read_s, time.perf_counter() - t0), min(read_cpu, time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            shard_dataset(root / "src", "sen12ms", root / f"out{r}", maxcount=args.maxcount, workers=args.workers, command=["bench"])
            shard_s, shard_cpu = min(shard_s, time.perf_counter() - t0), min(shard_cpu, time.process_time() - c0)
            shutil.rmtree(root / f"out{r}")
    ratio = shard_s / read_s
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
        "goal_overhead_pct": 30.0,
        "meets_goal": ratio < 1.3,
    }
