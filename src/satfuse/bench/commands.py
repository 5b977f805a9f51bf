"""`satfuse bench NAME`: every benchmark, each writing JSON with its in-run reference and ratio.

Each benchmark module exposes `add_arguments(parser)` and `run(args) -> dict`. `bench all`
runs every one with its small defaults (sized for 2 CPU cores, < 10 minutes together) and
writes one JSON file.
"""

from __future__ import annotations

import argparse
import logging
import time

from satfuse.bench.common import write_result
from satfuse.utils import import_unless_optional_missing

log = logging.getLogger(__name__)

BENCHES = {
    "shard": "satfuse.bench.shard",  # sharding vs plain rasterio reads
    "loader": "satfuse.bench.loader",  # streaming loader vs per-file reads vs raw bytes
    "io": "satfuse.bench.io",  # bytes read from storage per pair, cold/warm, per crop and encoding; GB/s model
    "loss": "satfuse.bench.loss",  # global loss time/memory vs global batch
    "ckpt": "satfuse.bench.ckpt",  # DCP save/load vs torch.save/load
    "engines": "satfuse.bench.engines",  # DDP vs DeepSpeed ZeRO-1/2 (ZeRO-0/3 on request)
    "memory": "satfuse.bench.memory",  # peak memory per rank and largest batch in a budget: DDP, ZeRO-1/2/3, +/- activation checkpointing
    "train": "satfuse.bench.train",  # training-step throughput, 1 vs 2 ranks, fp32/bf16, GPU rows
    "model": "satfuse.bench.model",  # communication and memory model, 1..1024 GPUs
    "commbytes": "satfuse.bench.commbytes",  # wire bytes of a 2-node run vs the model
    "gpu": "satfuse.bench.gpu",  # CUDA-path check + pairs/s per GPU (`make gpu-check`)
}
# Needs root and the 2-node cluster of slurm/local-cluster/multinode.sh: not part of `bench all`.
NEEDS_CLUSTER = {"commbytes"}
# Its own check (`make gpu-check`; CI runs its --device cpu --quick dry run), and the memory
# search (minutes of ViT-B steps per row; the README table's command): not part of `bench all`.
STANDALONE = {"gpu", "memory"}
# `bench all` runs these with other arguments than their defaults, to stay within minutes:
# bench io packs and reads the synthetic set cold once per encoding (~30 s each here); all
# runs the plain and the smallest encoding (`satfuse bench io` alone measures every one).
ALL_ARGS: dict[str, list[str]] = {"io": ["--variants", "default", "zstd+float16+no-labels"]}
# `bench all --smallest`: every benchmark at the smallest sizes it accepts, with one row of each
# kind its JSON holds (seconds each, the whole in about a minute), so that the test suite checks
# how `bench all` assembles its JSON without paying for the measurement (the full run took 4-11
# minutes of a 17-38 minute suite). Its figures mean nothing; the JSON says `"smallest": true`.
SMALLEST_ARGS: dict[str, list[str]] = {
    "shard": ["--pairs", "4", "--size", "32", "--maxcount", "2", "--repeats", "1"],
    "loader": ["--scenes", "1", "--patches", "16", "--size", "32", "--maxcount", "4", "--workers", "0", "1",
               "--no-fresh", "--batch", "4", "--crops", "16", "--repeats", "1", "--epochs", "1",
               "--encodings"],
    "io": ["--variants", "default", "--scenes", "1", "--patches", "4", "--size", "32", "--maxcount", "4",
           "--crops", "16", "--batch", "4", "--geometry-samples", "2", "--rate", "16=5000", "--nodes", "1"],
    "loss": ["--sizes", "8", "--dim", "8", "--repeats", "1"],
    "ckpt": ["--params-m", "0.05", "--width", "64", "--repeats", "1"],
    "engines": ["--engines", "zero1", "--ranks", "1", "--batch", "2", "--crop", "16", "--steps", "1",
                "--warmup", "1"],
    "train": ["--models", "tiny", "--precisions", "fp32", "--batch", "2", "--crop", "16", "--steps", "1",
              "--repeats", "1"],
    "model": ["--nodes", "1", "--backbone", "tiny", "--proj-hidden", "32", "--proj-out", "8"],
}


def available() -> dict[str, object]:
    """The importable benchmarks; one whose optional dependency is missing is reported at
    warning level and left out, never silently; any other import error propagates."""
    mods = {}
    for name, path in BENCHES.items():
        mod = import_unless_optional_missing(path, f"bench {name} is")
        if mod is not None:
            mods[name] = mod
    return mods


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (JSON with in-run references and ratios)")
    bsub = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, mod in available().items():
        bp = bsub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0])
        bp.add_argument("--out", default=None, help="write the JSON result here")
        mod.add_arguments(bp)
        bp.set_defaults(func=lambda a, m=mod, n=name: run_one(n, m, a))
    ap = bsub.add_parser("all", help="run every benchmark with small defaults, one JSON")
    ap.add_argument("--out", default="bench/RESULTS.json")
    ap.add_argument("--skip", nargs="*", default=[], help="benchmarks to leave out")
    ap.add_argument("--smallest", action="store_true",
                    help="every benchmark at its smallest sizes: checks that each runs and the JSON is "
                         "complete in about a minute; the figures are not measurements to compare")
    ap.set_defaults(func=run_all)


def run_one(name: str, mod, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    result = {"bench": name, "result": mod.run(args), "wall_s": round(time.perf_counter() - t0, 3)}
    write_result(result, args.out)
    return 0 if result["result"].get("ok", True) else 1  # a failed check fails the command


def defaults_for(mod, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    mod.add_arguments(parser)
    return parser.parse_args(argv or [])


def run_all(args: argparse.Namespace) -> int:
    results: dict[str, object] = {}
    t_all = time.perf_counter()
    for name, mod in available().items():
        if name in args.skip or name in NEEDS_CLUSTER or name in STANDALONE:
            continue
        log.info("bench %s ...", name)
        t0 = time.perf_counter()
        argv = SMALLEST_ARGS.get(name, []) if args.smallest else ALL_ARGS.get(name)
        results[name] = {"result": mod.run(defaults_for(mod, argv)), "wall_s": round(time.perf_counter() - t0, 3)}
    write_result({"bench": "all", "smallest": args.smallest, "benches": results,
                  "wall_s": round(time.perf_counter() - t_all, 3)}, args.out)
    return 0
