"""A small trainer with the real trainer's contract, for launch tests that must not depend on
data and models: same config file, same process-group set-up (`init_distributed`), same stop
flag (`StopFlag`: USR1/USR2/TERM/HUP on every rank, agreed by all-reduce at step boundaries),
same run-dir layout (`checkpoints/step_XXXXXXXX/`, `checkpoints/latest`, `metrics.jsonl`) and
the same return codes (0 done, 75 saved-requeue-me, 143 saved-after-SIGTERM).

Each step all-reduces (rank + 1) so the metrics prove the world size the job really had.
`TOY_STEP_S` sets the time per step (default 0.2 s) so tests can signal mid-run. Each rank
writes its pid to `RUN_DIR/pid.RANK` (tests signal one task from outside SLURM);
`TOY_LINGER_S` holds a stopped run that long after its exit code was decided (the teardown
window in which a late SIGTERM must still win over a requeue).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from satfuse.config import PretrainConfig, load_config
from satfuse.distributed.env import init_distributed, teardown
from satfuse.engines.signals import StopFlag
from satfuse.utils import atomic_write_text


def _save(run_dir: Path, step: int, total: float) -> None:
    ck = run_dir / "checkpoints"
    atomic_write_text(ck / f"step_{step:08d}" / "state.json", json.dumps({"step": step, "total": total}))
    atomic_write_text(ck / "latest", f"step_{step:08d}\n")


def _resume(run_dir: Path) -> tuple[int, float]:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return 0, 0.0
    state = json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "state.json").read_text())
    return int(state["step"]), float(state["total"])


def run(config_path: str | None, overrides: list[str]) -> int:
    cfg = load_config(PretrainConfig, config_path, overrides)
    env = init_distributed(timeout_s=cfg.train.comm_timeout_s)
    run_dir = Path(cfg.train.run_dir)
    step, total = _resume(run_dir)
    stop = StopFlag().install()
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    step_s = float(os.environ.get("TOY_STEP_S", "0.2"))
    atomic_write_text(run_dir / f"pid.{env.rank}", str(os.getpid()))
    try:
        while step < cfg.train.steps:
            time.sleep(step_s)
            t = torch.tensor([float(env.rank + 1)])
            if dist.is_initialized():
                dist.all_reduce(t)
            step += 1
            total += float(t.item()) * step
            if env.rank == 0:
                with open(run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps({"step": step, "world": env.world_size, "reduced": t.item(),
                                         "attempt": attempt, "port": os.environ.get("MASTER_PORT")}) + "\n")
            if stop.should_stop():
                if env.rank == 0:
                    _save(run_dir, step, total)
                code = stop.exit_code
                time.sleep(float(os.environ.get("TOY_LINGER_S", "0")))
                return code
            if env.rank == 0 and step % cfg.checkpoint.every_steps == 0:
                _save(run_dir, step, total)
        if env.rank == 0:
            _save(run_dir, step, total)
        return 0
    finally:
        teardown()
