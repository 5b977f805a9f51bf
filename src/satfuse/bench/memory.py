"""Peak memory per rank, and the largest per-rank batch that fits a budget: DDP vs DeepSpeed ZeRO-1/2/3, each with and without activation checkpointing.

Every set-up trains the same Dual-SimCLR (same seed, the real global loss, Adam) through
satfuse's engine layer (`satfuse.bench.engines`' config and rank runner pieces) on N gloo
ranks, in fresh rank processes per set-up, so no allocator or DeepSpeed state leaks between
rows. `model.activation_checkpointing` is applied by `build_pretrain_model`, as in training.

Memory (CPU): the peak resident set size of each rank process (`getrusage` ru_maxrss) minus
that rank's RSS once torch and DeepSpeed are imported and the process group is up, before the
model is built (`idle_baseline_mib`, reported: ~0.8 GB with the CUDA build of torch). The
budget (`--budget-gb`) applies to that difference, the max over ranks.

The search is one optimizer step per probe. Doubling: one launch runs steps at per-rank
batch 1, 2, 4, ... (up to `--max-batch`) and stops at the first whose peak exceeds the
budget; the high-water mark only grows, so each step's ru_maxrss is that batch's peak.
Bisection: a second launch probes three evenly spaced batches between the last that fitted
and the first that did not, in increasing order, so `largest_batch` is exact to a quarter of
that interval (`resolution`). A watchdog thread ends a rank whose RSS passes the budget by
25% mid-step (the probe counts as not fitting), so an over-budget probe never takes a shared
machine's memory. `--max-batch` caps the search: a set-up that fits it reports
`largest_batch` = the cap and `capped: true`, and a factor against it is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from satfuse.bench.engines import SETUPS, _config, _peak_rss_mib, _rss_mib
from satfuse.distributed.env import teardown
from satfuse.distributed.launcher_env import WorldInfo, export_torchrun_vars
from satfuse.distributed.ports import free_port
from satfuse.utils import SatfuseError, atomic_write_text

WATCHDOG_EXIT = 86  # a rank ended by the watchdog (over budget mid-step)
WATCHDOG_SLACK = 1.25  # the watchdog's limit, relative to the budget


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", nargs="*", default=["ddp", "zero1", "zero2", "zero3"],
                   choices=sorted(SETUPS), help="set-ups; DDP (the reference) is always measured")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backbone", default="vit_base_patch16", help="a registered backbone (model.backbone)")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--budget-gb", type=float, default=5.0,
                   help="memory per rank above the idle baseline that a batch must fit in (GB = 2**30 bytes)")
    p.add_argument("--max-batch", type=int, default=64, help="largest per-rank batch the search tries")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--no-checkpointing-rows", action="store_true",
                   help="only the rows with model.activation_checkpointing=false")


def _watchdog(limit_mib: float) -> None:
    """End this rank when its RSS passes `limit_mib` (checked every 20 ms)."""
    def watch() -> None:
        while True:
            if _rss_mib() > limit_mib:
                os._exit(WATCHDOG_EXIT)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True, name="memory-watchdog").start()


def _rank_main(rank: int, world: int, port: int, a: dict[str, Any], setup: str, ckpt: bool,
               batches: list[int], out_dir: str) -> None:
    """One rank: one optimizer step per batch in `batches` (increasing), recording the peak
    after each; stop (every rank alike) at the first over budget."""
    export_torchrun_vars(WorldInfo(rank=rank, local_rank=rank, world_size=world, local_world_size=world,
                                   master_addr="127.0.0.1", master_port=port))
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from satfuse.engines.setup import build_engine  # lazy: --help stays fast
    from satfuse.models import build_pretrain_model  # lazy: --help stays fast

    engine_kind, stage = SETUPS[setup]
    if engine_kind == "deepspeed":
        import deepspeed  # noqa: F401  # optional: deepspeed (loaded before the baseline)

    cfg = _config({**a, "batch": batches[0], "steps": len(batches), "warmup": 0}, engine_kind, stage, out_dir)
    cfg.model.activation_checkpointing = ckpt
    base = _rss_mib()
    budget_mib = a["budget_gb"] * 1024
    _watchdog(base + WATCHDOG_SLACK * budget_mib)
    torch.manual_seed(0)
    module = build_pretrain_model(cfg.model, img_size=a["crop"])
    engine = build_engine(module, torch.device("cpu"), cfg.train, cfg.optim, cfg.checkpoint, cfg.deepspeed,
                          micro_batch=cfg.data.batch_size)
    g = torch.Generator().manual_seed(rank)
    probes = []
    for b in batches:
        batch = {"s1": torch.randn(b, 2, a["crop"], a["crop"], generator=g),
                 "s2": torch.randn(b, 13, a["crop"], a["crop"], generator=g)}
        t0 = time.perf_counter()
        with engine.autocast():
            outputs = engine.model(batch)
        loss, _ = module.loss(outputs, cfg.loss)
        engine.backward_step(loss)
        del outputs, loss, batch
        peak = torch.tensor([_peak_rss_mib() - base])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # every rank decides alike
        probes.append({"batch": b, "peak_mib": float(peak), "step_s": time.perf_counter() - t0})
        atomic_write_text(Path(out_dir, f"rank{rank}.json"), json.dumps(
            {"idle_baseline_mib": base, "probes": probes}))
        if float(peak) > budget_mib:
            break
    dist.barrier()
    teardown()
    os._exit(0)  # gloo threads alive at interpreter exit can abort the process


def _launch(setup: str, ckpt: bool, batches: list[int], a: dict[str, Any], world: int) -> dict[str, Any]:
    """Run one launch of rank processes; what rank 0 recorded (probes that finished)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-memory-{setup}-") as tmp:
        try:
            mp.spawn(_rank_main, args=(world, free_port(), a, setup, ckpt, batches, tmp), nprocs=world, join=True)
            killed = False
        except mp.ProcessExitedException as exc:
            if exc.exit_code != WATCHDOG_EXIT:
                raise
            killed = True
        path = Path(tmp, "rank0.json")
        if not path.is_file():
            if killed:  # over budget before the first step ended
                return {"probes": [], "killed_at": batches[0]}
            raise SatfuseError(f"bench memory: {setup} wrote no result; run it alone to see the rank's error")
        got = json.loads(path.read_text())
    done = [p["batch"] for p in got["probes"]]
    if killed:
        got["killed_at"] = next(b for b in batches if b not in done)
    return got


def _search(setup: str, ckpt: bool, a: dict[str, Any], world: int) -> dict[str, Any]:
    """Doubling, then one bisection launch (module doc)."""
    budget = a["budget_gb"] * 1024
    doubling = [1 << i for i in range(a["max_batch"].bit_length()) if 1 << i <= a["max_batch"]]
    if doubling[-1] != a["max_batch"]:
        doubling.append(a["max_batch"])
    first = _launch(setup, ckpt, doubling, a, world)
    probes = list(first["probes"])

    def bounds() -> tuple[int, int | None]:
        fit = [p["batch"] for p in probes if p["peak_mib"] <= budget]
        over = [p["batch"] for p in probes if p["peak_mib"] > budget]
        over += [launch["killed_at"] for launch in launches if "killed_at" in launch]
        return max(fit, default=0), min(over, default=None)

    launches = [first]
    lo, hi = bounds()
    if hi is not None and hi - lo > 1:
        mids = sorted({lo + k * (hi - lo) // 4 for k in (1, 2, 3)} - {lo, hi})
        second = _launch(setup, ckpt, mids, a, world)
        launches.append(second)
        probes += second["probes"]
        lo, hi = bounds()
    peaks = {str(p["batch"]): round(p["peak_mib"], 1) for p in sorted(probes, key=lambda p: p["batch"])}
    return {
        "largest_batch": lo,
        "first_over_budget": hi,
        "capped": hi is None,
        "resolution": 1 if hi is None else max(1, (hi - lo)),
        "peak_mib_by_batch": peaks,
        "peak_mib_at_1": peaks.get("1"),
        "idle_baseline_mib": round(first.get("idle_baseline_mib", float("nan")), 1),
        "activation_checkpointing": ckpt,
        "step_s_at_1": next((round(p["step_s"], 3) for p in probes if p["batch"] == 1), None),
        "launches": len(launches),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.budget_gb <= 0 or args.max_batch < 1:
        raise SatfuseError("bench memory: --budget-gb must be > 0 and --max-batch >= 1")
    a = {"backbone": args.backbone, "crop": args.crop, "precision": args.precision,
         "budget_gb": args.budget_gb, "max_batch": args.max_batch}
    setups = list(dict.fromkeys(["ddp", *args.engines]))
    modes = (False,) if args.no_checkpointing_rows else (False, True)
    rows: dict[str, dict[str, Any]] = {}
    for setup in setups:
        for ckpt in modes:
            rows[f"{setup}{'+ac' if ckpt else ''}"] = _search(setup, ckpt, a, args.ranks)
    ref = rows["ddp"]
    for row in rows.values():
        row["batch_vs_ddp"] = row["largest_batch"] / ref["largest_batch"] if ref["largest_batch"] else None
        if row["peak_mib_at_1"] is not None and ref["peak_mib_at_1"]:
            row["peak_at_1_vs_ddp"] = row["peak_mib_at_1"] / ref["peak_mib_at_1"]
    best = "zero3+ac" if "zero3+ac" in rows else None
    return {
        "setup": {**a, "ranks": args.ranks, "device": "cpu (gloo, DeepSpeed CPU accelerator)",
                  "memory": "peak RSS (ru_maxrss) per rank minus its idle baseline (torch + DeepSpeed "
                            "imported, process group up); max over ranks; one optimizer step per probe"},
        "rows": rows,
        "zero3_ac_batch_factor_vs_ddp": rows[best]["batch_vs_ddp"] if best else None,
        "zero3_ac_factor_is_lower_bound": bool(best and rows[best]["capped"]),
    }
