"""Start `satfuse pretrain` as N real rank processes (what torchrun or srun would do)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from satfuse.distributed.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def start_ranks(world: int, overrides: list[str], config: str = "hpc/pretrain/tiny.yaml",
                log_dir: Path | None = None, entry: str = "satfuse.cli") -> list[subprocess.Popen]:
    """`entry`: the module run with `-m` (tests.engines.recording_pretrain records batch keys)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        out = open(log_dir / f"rank{rank}.log", "ab") if log_dir else subprocess.DEVNULL  # noqa: SIM115
        cmd = [sys.executable, "-m", entry, "pretrain", "--config", str(ROOT / config), *overrides]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def run_ranks(world: int, overrides: list[str], log_dir: Path, **kw) -> list[int]:
    return wait_all(start_ranks(world, overrides, log_dir=log_dir, **kw))


def logs(log_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("rank*.log")))


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    """Block until metrics.jsonl reports `step` (or a rank died)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(m.get("step", 0) >= step for m in metrics(run_dir)):
            return
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a rank exited early: {[p.poll() for p in procs]}")
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def kill_all(procs: list[subprocess.Popen], sig: int = signal.SIGKILL) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    for p in procs:
        p.wait(timeout=60)


def final_params(ckpt_dir: Path) -> dict:
    """All tensors of a DCP checkpoint, loaded without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt_dir.parent / f"{ckpt_dir.name}.consolidated.pt"
    if not out.exists():
        dcp_to_torch_save(ckpt_dir, out)
    return torch.load(out, weights_only=False)


def flatten(d, prefix=""):
    import torch

    items = {}
    if isinstance(d, dict):
        for k, v in d.items():
            items.update(flatten(v, f"{prefix}{k}."))
    elif torch.is_tensor(d):
        items[prefix[:-1]] = d
    return items
