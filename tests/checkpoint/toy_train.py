"""A small but complete training loop that uses the checkpoint library the way the trainer does.

Run one process per rank (the tests start them with RANK/WORLD_SIZE/MASTER_* set, like
torchrun does). Everything that exact resume depends on is exercised: DDP over gloo,
AdamW state, an LR schedule, a GradScaler whose scale changes during the run, dropout
(torch RNG), noise from NumPy's and Python's global generators, and a loader position that
follows the real loader's contract (`state_dict()` per rank, `load_state_dict(all ranks)`).

Outputs (for the tests to compare): `--out` gets rank 0's final model+optimizer state, the
data log `--data-log` gets one JSON line per step and rank with the sample ids it trained on,
`--progress` gets the last finished step (rank 0), and `--check-after-load` compares the
freshly loaded state with a reference file and writes the verdict next to it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from satfuse.checkpoint.manager import CheckpointManager
from satfuse.checkpoint.state import ModelOptimState
from satfuse.distributed.env import teardown
from satfuse.engines.rng import capture_rng, restore_rng
from satfuse.engines.signals import REQUEUE_EXIT_CODE, StopFlag

EPOCH_SIZE = 48
PER_RANK_BATCH = 2


class ToyModel(nn.Module):
    """Two 'backbones' (like the dual model) + a head, with dropout so torch RNG matters."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.s1 = nn.Sequential(nn.Linear(2, width), nn.ReLU())
        self.s2 = nn.Sequential(nn.Linear(6, width), nn.ReLU())
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat([self.s1(x[:, :2]), self.s2(x[:, 2:])], dim=1)
        return self.head(self.drop(z))

    def backbones(self) -> dict[str, nn.Module]:
        return {"s1": self.s1, "s2": self.s2}

    def in_channels(self) -> dict[str, int]:
        return {"s1": 2, "s2": 6}


class ToyLoader:
    """Deterministic epochs: a permutation per (seed, epoch); each step takes the next
    world_size x batch samples of it, rank r its r-th slice. A tail shorter than one
    global batch is dropped (documented: at most global_batch - 1 samples per epoch)."""

    def __init__(self, seed: int, rank: int, world: int) -> None:
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.pos = 0, 0  # pos: samples of this epoch consumed by all ranks

    def perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return torch.randperm(EPOCH_SIZE, generator=g).tolist()

    def next_ids(self) -> tuple[int, list[int]]:
        gb = self.world * PER_RANK_BATCH
        if self.pos + gb > EPOCH_SIZE:
            self.epoch, self.pos = self.epoch + 1, 0
        perm = self.perm()[self.pos:self.pos + gb]
        self.pos += gb
        return self.epoch, perm[self.rank * PER_RANK_BATCH:(self.rank + 1) * PER_RANK_BATCH]

    def state_dict(self) -> dict[str, int]:
        # Per rank, like the real loader: this rank's consumption and the world it ran in.
        return {"epoch": self.epoch, "seen": self.pos // self.world, "world_size": self.world}

    def load_state_dict(self, states: list[dict[str, int]]) -> None:
        self.epoch = states[0]["epoch"]
        self.pos = sum(s["seen"] for s in states)


def sample(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + i)
    return torch.randn(8, generator=g), torch.randn(4, generator=g)


def make_batch(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(sample(i) for i in ids), strict=True)
    x = torch.stack(xs)
    # Augmentation noise from the global NumPy and Python generators (their state must resume).
    x = x + torch.from_numpy(np.random.standard_normal(x.shape).astype(np.float32)) * 0.1
    x = x * (1.0 + 0.05 * random.random())
    return x, torch.stack(ys)


class SlowPickle:
    """Rank state that takes seconds to pickle: lets a test SIGKILL the run mid-save."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[Any, ...]:
        time.sleep(self.seconds)
        return (float, (self.seconds,))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--every", type=int, default=0)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--resume", default="auto")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step")
    p.add_argument("--slow-save-at", type=int, default=-1)
    p.add_argument("--ballast-at", type=int, default=-1, help="rank 1 saves N MiB extra at this step")
    p.add_argument("--ballast-mib", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--data-log", default="")
    p.add_argument("--progress", default="")
    p.add_argument("--check-after-load", default="")
    p.add_argument("--defer-checksums", action="store_true", help="verify crc32s while loading (DDP engine's path)")
    return p.parse_args(argv)


def dump_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    sd = ModelOptimState(model, opt).state_dict()
    return {"model": {k: v.clone() for k, v in sd["model"].items()},
            "optim": {k: {n: t.clone() for n, t in v.items()}
                      for k, v in sd["optim"]["state"].items()}}


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    bad = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    for k in a["optim"]:
        bad += [f"optim {k}.{n}" for n in a["optim"][k] if not torch.equal(a["optim"][k][n], b["optim"][k][n])]
    return bad


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # launch.wait asks for stacks on a hang. SIGQUIT, because StopFlag takes SIGUSR1/2, TERM, HUP.
    faulthandler.register(signal.SIGQUIT, all_threads=True)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    module = ToyModel()
    model = DDP(module) if world > 1 else module
    opt = torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    loader = ToyLoader(args.seed, rank, world)
    torch.manual_seed(args.seed * 100 + rank)  # per-rank streams from here on
    np.random.seed(args.seed * 100 + rank)
    random.seed(args.seed * 100 + rank)

    # A hang in a checkpoint collective fails in 60 s with a stack, like the default group.
    mgr = CheckpointManager(Path(args.run_dir), keep_last=args.keep_last, async_save=args.async_save,
                            timeout_s=60.0)
    step = 0

    def app_state() -> dict[str, Any]:
        return {"model_optim": ModelOptimState(module, opt), "scheduler": sched, "scaler": scaler}

    path = mgr.find_resume(args.resume, checksums=not args.defer_checksums)
    if path is not None:
        rank_states, meta = mgr.load(path, app_state())
        step = int(meta["step"])
        loader.load_state_dict([s["loader"] for s in rank_states])
        if len(rank_states) == world:
            restore_rng(rank_states[rank]["rng"])
        if args.check_after_load:
            ref = torch.load(args.check_after_load, weights_only=True)
            bad = compare(ref, dump_state(module, opt))
            verdict = {"rank": rank, "bad": bad, "step": step, "scale": scaler.get_scale(),
                       "last_epoch": sched.last_epoch, "saved_world": len(rank_states),
                       "loaded": mgr.loaded_path.name if mgr.loaded_path else None}
            Path(f"{args.check_after_load}.rank{rank}.json").write_text(json.dumps(verdict))

    stop = StopFlag().install()
    log = open(args.data_log + f".rank{rank}", "a") if args.data_log else None  # noqa: SIM115
    code = 0
    while step < args.steps:
        if stop.should_stop():
            mgr.save(step, app_state(), rank_state(loader, step), {"epoch": loader.epoch})
            code = REQUEUE_EXIT_CODE
            break
        epoch, ids = loader.next_ids()
        x, y = make_batch(ids)
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        if log:
            log.write(json.dumps({"step": step, "epoch": epoch, "ids": ids}) + "\n")
            log.flush()
        if args.every and step % args.every == 0:
            extra: dict[str, Any] = {}
            if step == args.slow_save_at and rank == 1:
                extra["slow"] = SlowPickle(30.0)
            if step == args.ballast_at and rank == 1:  # fills a small disk: save must fail cleanly
                extra["ballast"] = torch.ones(args.ballast_mib << 18)
            mgr.save(step, app_state(), {**rank_state(loader, step), **extra}, {"epoch": loader.epoch})
        if args.progress and rank == 0:
            Path(args.progress).write_text(str(step))
        if args.sleep:
            time.sleep(args.sleep)
    mgr.wait()
    if args.out and rank == 0 and code == 0:
        torch.save(dump_state(module, opt), args.out)
    teardown()  # as the trainer ends: no barrier; the group is left to os._exit (see teardown)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def rank_state(loader: ToyLoader, step: int) -> dict[str, Any]:
    return {"loader": loader.state_dict(), "rng": capture_rng(), "step": step}


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))


def build_toy(meta: dict[str, Any]) -> ToyModel:
    """Builder for `export_backbones` / `satfuse ckpt export --builder`."""
    return ToyModel()
