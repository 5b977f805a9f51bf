"""Training-step throughput (pairs/s) of Dual-SimCLR: tiny and ResNet-50, 1 and 2 DDP ranks,
fp32 and bf16, and the scaling efficiency of 2 ranks over 1, measured in one run.

Each rank uses one CPU thread, so "2 ranks vs 1" compares equal work per worker: the
efficiency is (pairs/s on 2 ranks) / (2 x pairs/s on 1 rank), which is what the global-loss
all-gather and the gradient all-reduce cost. Inputs are fixed in-memory tensors, so the
figure is the model + loss + communication, not the loader (see `bench loader`). On a GPU
the same rows are measured per GPU; without one they say "no GPU". On a CPU without native
bf16 (no avx512_bf16/amx_bf16) the bf16 rows time one step and say `bf16_emulated`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from satfuse.bench.common import paper_scale
from satfuse.config import LossConfig, ModelConfig
from satfuse.distributed.env import teardown
from satfuse.distributed.launcher_env import export_rendezvous
from satfuse.distributed.ports import free_port
from satfuse.engines.base import cpu_has_native_bf16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="*", default=["tiny", "resnet50"])
    p.add_argument("--ranks", nargs="*", type=int, default=[1, 2])
    p.add_argument("--precisions", nargs="*", default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=16, help="pairs per rank (tiny)")
    p.add_argument("--batch-resnet50", type=int, default=4, help="pairs per rank (resnet50 and other 2048-wide trunks)")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps (after 1 warm-up step)")
    p.add_argument("--log-every", type=int, default=10,
                   help="retrieval metric every N steps, as train.log_every (compared with every step)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timings per variant (the fastest is kept)")
    p.add_argument("--gpu-crop", type=int, default=256)
    p.add_argument("--gpu-batch", type=int, default=64)


def model_cfg(backbone: str) -> ModelConfig:
    hidden, out = (2048, 128) if paper_scale(backbone) else (256, 64)
    return ModelConfig(method="dual_simclr", backbone=backbone, proj_hidden=hidden, proj_out=out)


def time_steps(backbone: str, batch: int, crop: int, steps: int, precision: str,
               device: torch.device, metrics_every: int = 10) -> float:
    """Seconds per optimizer step in this process (inside a process group or not), with the
    trainer's per-step collectives: the loss's gathers, one control-flag reduction, and the
    retrieval metric on every `metrics_every`-th step (the trainer's train.log_every; 1 =
    every step, how the trainer worked before metrics moved to log steps)."""
    from torch.nn.parallel import DistributedDataParallel as DDP  # lazy: --help stays fast

    from satfuse.distributed.collectives import agree_max, control_group  # lazy: --help stays fast
    from satfuse.models import build_pretrain_model  # lazy: --help stays fast

    torch.manual_seed(0)
    module = build_pretrain_model(model_cfg(backbone), img_size=crop).to(device)
    model = DDP(module) if dist.is_initialized() and dist.get_world_size() > 1 else module
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)
    data = {"s1": torch.randn(batch, 2, crop, crop, device=device),
            "s2": torch.randn(batch, 13, crop, crop, device=device)}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    count = [0]

    def step() -> None:
        count[0] += 1
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            out = model(data)
        loss, _ = module.loss(out, LossConfig(temperature=0.1), metrics=count[0] % metrics_every == 0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        agree_max([0], control_group())  # the stop-flag agreement of every trainer step

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _rank_main(rank: int, world: int, port: int, job: dict, out: dict) -> None:
    torch.set_num_threads(1)
    export_rendezvous("127.0.0.1", port)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    # side by side in one process: metrics on log steps (now) and on every step (before),
    # interleaved `repeats` times (order alternating), the fastest of each kept: on a shared
    # machine the minimum is the least disturbed measurement
    best: dict[str, float] = {}
    variants = [("sec", job["log_every"]), ("sec_metrics_every_step", 1)]
    for rep in range(job["repeats"]):
        for key, every in variants if rep % 2 == 0 else variants[::-1]:
            sec = time_steps(job["backbone"], job["batch"], job["crop"], job["steps"], job["precision"],
                             torch.device("cpu"), metrics_every=every)
            if world > 1:
                t = torch.tensor([sec])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                sec = float(t)
            best[key] = min(sec, best.get(key, float("inf")))
    if rank == 0:
        out.update(best)
    if world > 1:  # leave through os._exit: see distributed.env.teardown
        teardown()
        sys.stdout.flush()
        os._exit(0)


def cpu_row(backbone: str, world: int, precision: str, args: argparse.Namespace) -> dict:
    batch = args.batch_resnet50 if paper_scale(backbone) else args.batch
    # Without native bf16 torch emulates it (far slower than fp32; this row's sec_per_step says
    # by how much): one timed step is enough to show that, and keeps `bench all` within 10 minutes.
    emulated = precision == "bf16" and cpu_has_native_bf16() is False
    steps = 1 if emulated else args.steps
    job = dict(backbone=backbone, batch=batch, crop=args.crop, steps=steps, precision=precision,
               log_every=args.log_every, repeats=1 if emulated else args.repeats)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank_main, args=(world, free_port(), job, out), nprocs=world,
                           start_method="fork" if world == 1 else "spawn")
        sec, before = float(out["sec"]), float(out["sec_metrics_every_step"])
    return {"model": backbone, "ranks": world, "precision": precision, "batch_per_rank": batch,
            "crop": args.crop, "steps": steps, "bf16_emulated": emulated, "sec_per_step": sec,
            "pairs_per_s": world * batch / sec, "log_every": args.log_every,
            "sec_per_step_metrics_every_step": before,
            "metrics_on_log_steps_speedup": before / sec}


def gpu_rows(args: argparse.Namespace) -> list[dict]:
    if not torch.cuda.is_available():
        return [{"model": "resnet50", "precision": p, "pairs_per_s_per_gpu": "no GPU"}
                for p in ("bf16", "fp16")]
    rows = []
    for precision in ("bf16", "fp16"):
        torch.cuda.reset_peak_memory_stats()
        sec = time_steps("resnet50", args.gpu_batch, args.gpu_crop, args.steps, precision,
                         torch.device("cuda"))
        rows.append({"model": "resnet50", "precision": precision, "batch": args.gpu_batch,
                     "crop": args.gpu_crop, "pairs_per_s_per_gpu": args.gpu_batch / sec,
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})
    return rows


def run(args: argparse.Namespace) -> dict:
    rows = [cpu_row(m, w, p, args) for m in args.models for p in args.precisions for w in args.ranks]
    scaling = []
    for m in args.models:
        for p in args.precisions:
            by = {r["ranks"]: r for r in rows if r["model"] == m and r["precision"] == p}
            if 1 in by and 2 in by:
                eff = by[2]["pairs_per_s"] / (2 * by[1]["pairs_per_s"])
                scaling.append({"model": m, "precision": p, "efficiency_2_vs_1": eff})
    return {"cpu": rows, "scaling": scaling, "gpu": gpu_rows(args),
            "note": "one CPU thread per rank; in-memory inputs; DDP + global NT-Xent loss"}
