"""Global contrastive loss: forward+backward time and memory vs global batch, 1 vs N gloo ranks.

Compared in one run, for each global batch size G (embedding size D):
- reference: one process computing nt_xent on all G pairs;
- `world` gloo ranks (default 2), G / world pairs each, local-loss scheme (each rank's rows
  against the gathered global batch: logits 2n x 2G) and the full scheme (every rank builds
  the whole 2G x 2G logits).
Every process uses one thread, so the ratios compare the same per-process compute; on a
2-core machine 2 ranks use both cores. Times are best-of-`repeats`, the slowest rank.

Memory, honestly: on CUDA we report torch.cuda.max_memory_allocated during forward+backward;
on CPU torch has no allocator statistics, so we report the size of one fp32 logits matrix
per rank (the O(n x G) term that dominates at large G; autograd holds about three such:
logits, masked logits, softmax gradient) — computed, not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from satfuse.distributed.env import teardown
from satfuse.distributed.ports import free_port
from satfuse.losses import nt_xent
from satfuse.utils import SatfuseError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes", default="64,256,1024", help="global batch sizes (pairs), comma-separated"
    )
    p.add_argument("--dim", type=int, default=128, help="embedding size (authors: 128)")
    p.add_argument("--world", type=int, default=2, help="gloo ranks for the distributed rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--variant", choices=["nt_xent", "infonce"], default="nt_xent")


def logits_bytes(rows: int, cols: int, variant: str) -> int:
    """fp32 bytes of the logits of `rows` local pairs against `cols` global pairs."""
    return (2 * rows * 2 * cols if variant == "nt_xent" else 2 * rows * cols) * 4


def _step(n: int, dim: int, args: argparse.Namespace, local_loss: bool, seed: int) -> float:
    """One timed forward+backward of the loss on n fresh rows (seconds)."""
    g = torch.Generator().manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() and not dist.is_initialized() else "cpu"
    z1 = torch.randn(n, dim, generator=g).to(device).requires_grad_()
    z2 = torch.randn(n, dim, generator=g).to(device).requires_grad_()
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    nt_xent(z1, z2, args.temperature, args.variant, local_loss).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _best(n: int, args: argparse.Namespace, local_loss: bool) -> float:
    _step(n, args.dim, args, local_loss, seed=0)  # warm-up
    return min(_step(n, args.dim, args, local_loss, seed=i + 1) for i in range(args.repeats))


def _single_process(sizes: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for size in sizes:
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            secs = _best(size, args, local_loss=True)
            row = {"global_batch": size, "single_ms": round(secs * 1e3, 3)}
            if cuda:
                row["single_peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
            rows.append(row)
        return rows
    finally:
        torch.set_num_threads(threads)


def _rank_main(
    rank: int, world: int, port: int, sizes: list[int], args: argparse.Namespace, out: str
) -> None:
    """One gloo rank: time both schemes for every size; rank 0 writes the slowest rank's times."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = []
        for size in sizes:
            times = torch.tensor(
                [_best(size // world, args, True), _best(size // world, args, False)]
            )
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            result.append({"local_ms": float(times[0]) * 1e3, "full_ms": float(times[1]) * 1e3})
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.barrier()
        teardown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # gloo threads can abort a normal interpreter exit (deepspeed-cpu.md)


def _distributed(sizes: list[int], args: argparse.Namespace) -> list[dict[str, float]]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        # Only the plain fields travel (the CLI's namespace also holds an unpicklable `func`).
        opts = argparse.Namespace(
            **{k: getattr(args, k) for k in ("dim", "repeats", "temperature", "variant")}
        )
        mp.spawn(
            _rank_main, args=(args.world, port, sizes, opts, out), nprocs=args.world, join=True
        )
        return json.loads(Path(out).read_text())


def _parse_sizes(text: str, world: int) -> list[int]:
    try:
        sizes = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError as exc:
        raise SatfuseError(
            f"bench loss: --sizes {text!r} must be comma-separated integers, e.g. 64,256"
        ) from exc
    bad = [s for s in sizes if s < world or s % world]
    if not sizes or bad:
        raise SatfuseError(
            f"bench loss: global batch sizes {bad or text} must be positive multiples of --world {world}"
        )
    return sizes


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run both sides in this call and return rows with ratios (the bench CLI adds the machine)."""
    if args.world < 2:
        raise SatfuseError("bench loss: --world must be >= 2 (the reference is the single process)")
    sizes = _parse_sizes(args.sizes, args.world)
    rows = _single_process(sizes, args)
    for row, d in zip(rows, _distributed(sizes, args), strict=True):
        size, n = row["global_batch"], row["global_batch"] // args.world
        row.update(
            {
                f"ranks{args.world}_local_ms": round(d["local_ms"], 3),
                f"ranks{args.world}_full_ms": round(d["full_ms"], 3),
                "ratio_local_vs_single": round(d["local_ms"] / row["single_ms"], 3),
                "ratio_full_vs_single": round(d["full_ms"] / row["single_ms"], 3),
                "logits_bytes_single": logits_bytes(size, size, args.variant),
                "logits_bytes_per_rank_local": logits_bytes(n, size, args.variant),
                "logits_bytes_per_rank_full": logits_bytes(size, size, args.variant),
            }
        )
    return {
        "what": "nt_xent forward+backward, best of repeats, slowest rank; 1 thread per process",
        "dim": args.dim,
        "world": args.world,
        "variant": args.variant,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "memory": "CUDA: measured peak; CPU: computed bytes of one fp32 logits matrix per rank",
        "rows": rows,
    }
