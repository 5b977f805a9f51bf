"""DDP vs DeepSpeed ZeRO-1/2 (and optionally ZeRO-0): step time and memory per rank, one run.

Every set-up trains the same Dual-SimCLR (same seed, same in-memory batch, the real global
loss) through satfuse's engine layer (`DDPEngine`, `DeepSpeedEngine`) on N gloo ranks, each
set-up in fresh rank processes so that no allocator or DeepSpeed state leaks between rows.

Memory, per rank (the max over ranks is reported):
- `optim_state_mib`: bytes of the optimizer state this rank holds (Adam moments + fp32 master
  copies where the engine keeps them), counted from the tensors: deterministic, and where
  ZeRO's saving shows (stage 1/2 partition it over the ranks);
- `peak_rss_delta_mib`: peak resident set size (`getrusage` ru_maxrss, the process's
  high-water mark) minus the RSS just before the engine was built, i.e. what the engine,
  its buffers and the training steps added. On CPU this is noisy at small sizes (allocator
  caching, DeepSpeed's flat buffers); on a GPU read torch.cuda.max_memory_allocated instead.

Ratios are against DDP measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from satfuse.bench.common import paper_scale
from satfuse.config import PretrainConfig, from_dict
from satfuse.distributed.env import teardown
from satfuse.distributed.launcher_env import WorldInfo, export_torchrun_vars
from satfuse.distributed.ports import free_port

SETUPS = {
    "ddp": ("ddp", None),
    "zero0": ("deepspeed", 0),
    "zero1": ("deepspeed", 1),
    "zero2": ("deepspeed", 2),
    "zero3": ("deepspeed", 3),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", nargs="*", default=["ddp", "zero1", "zero2"], choices=sorted(SETUPS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backbone", default="tiny", help="a registered backbone (model.backbone)")
    p.add_argument("--batch", type=int, default=16, help="pairs per rank")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _optim_state_mib(engine: Any) -> float:
    """Optimizer-held tensors of this rank: moments, plus DeepSpeed's fp32 partitions."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if torch.is_tensor(t) and t.data_ptr() not in seen and t.numel() > 1:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for state in engine.optimizer.state.values():
        for v in state.values():
            add(v)
    ds_opt = getattr(engine, "ds_optimizer", None)
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        for t in getattr(ds_opt, name, None) or []:
            add(t)
    return total / 2**20


def _config(a: dict[str, Any], engine: str, stage: int | None, run_dir: str) -> PretrainConfig:
    hidden, out = (2048, 128) if paper_scale(a["backbone"]) else (256, 64)
    raw = {
        "data": {"batch_size": a["batch"], "crop": a["crop"]},
        "model": {"backbone": a["backbone"], "proj_hidden": hidden, "proj_out": out},
        "optim": {"name": "adam", "lr": 1e-4},
        "train": {"engine": engine, "precision": a["precision"], "device": "cpu", "run_dir": run_dir,
                  "steps": a["steps"] + a["warmup"]},
        "deepspeed": {"config": "hpc/deepspeed/zero0_fp32.json", "zero_stage": -1 if stage is None else stage},
    }
    return from_dict(PretrainConfig, raw)


def _rank_main(rank: int, world: int, port: int, a: dict[str, Any], setup: str, out_dir: str) -> None:
    """One rank: build the engine, time the steps, write this rank's JSON, exit hard."""
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

    cfg = _config(a, engine_kind, stage, out_dir)
    torch.manual_seed(0)
    module = build_pretrain_model(cfg.model)
    g = torch.Generator().manual_seed(rank)
    batch = {"s1": torch.randn(a["batch"], 2, a["crop"], a["crop"], generator=g),
             "s2": torch.randn(a["batch"], 13, a["crop"], a["crop"], generator=g)}
    base = _rss_mib()
    engine = build_engine(module, torch.device("cpu"), cfg.train, cfg.optim, cfg.checkpoint, cfg.deepspeed,
                          micro_batch=cfg.data.batch_size)
    times = []
    for i in range(a["warmup"] + a["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        with engine.autocast():
            outputs = engine.model(batch)
        loss, _ = module.loss(outputs, cfg.loss)
        engine.backward_step(loss)
        if i >= a["warmup"]:
            times.append(time.perf_counter() - t0)
    res = {"times": times, "peak_rss_delta_mib": _peak_rss_mib() - base, "rss_before_mib": base,
           "optim_state_mib": _optim_state_mib(engine), "loss": float(loss.detach())}
    Path(out_dir, f"{setup}_{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    teardown()
    os._exit(0)  # gloo threads alive at interpreter exit can abort the process


def _measure(setup: str, a: dict[str, Any], world: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{setup}-") as tmp:
        mp.spawn(_rank_main, args=(world, free_port(), a, setup, tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"{setup}_{r}.json").read_text()) for r in range(world)]
    per_step = [max(ts) for ts in zip(*(r["times"] for r in ranks), strict=True)]
    return {
        "step_s_median": statistics.median(per_step),
        "step_s_min": min(per_step),
        "optim_state_mib": max(r["optim_state_mib"] for r in ranks),
        "peak_rss_delta_mib": max(r["peak_rss_delta_mib"] for r in ranks),
        "final_loss": ranks[0]["loss"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    a = {k: getattr(args, k) for k in ("backbone", "batch", "crop", "steps", "warmup", "precision")}
    setups = list(dict.fromkeys(["ddp", *args.engines]))  # DDP is the reference, always
    rows = {name: _measure(name, a, args.ranks) for name in setups}
    ref = rows["ddp"]
    for row in rows.values():
        row["step_time_vs_ddp"] = row["step_s_median"] / ref["step_s_median"]
        row["optim_state_vs_ddp"] = row["optim_state_mib"] / max(ref["optim_state_mib"], 1e-9)
        row["peak_rss_delta_vs_ddp"] = row["peak_rss_delta_mib"] / max(ref["peak_rss_delta_mib"], 1e-9)
    return {
        "setup": {**a, "ranks": args.ranks, "device": "cpu (gloo, DeepSpeed CPU accelerator)",
                  "memory": "optim_state_mib counted from optimizer tensors per rank; "
                            "peak_rss_delta_mib = ru_maxrss - RSS before the engine, per rank; max over ranks"},
        "engines": rows,
    }
