"""Helpers of the 2-node launch tests: submit/sbatch on the 2-node cluster, a 1-node reference
run with the same global batch, and readers for metrics, checkpoints and task logs.

Why a 1-node run with *two ranks* is the reference: same world size and per-rank batch means
the same data on every rank and the same arithmetic (gloo sums two gradients the same way
wherever the ranks live), so the 2-node losses must be bitwise equal to it. A single process
with the doubled batch would differ slightly (BatchNorm statistics per rank in train mode).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from .conftest import REPO, cluster_env

PYTHON = REPO / ".venv" / "bin" / "python"
SATFUSE = REPO / ".venv" / "bin" / "satfuse"
TINY = REPO / "hpc" / "pretrain" / "tiny.yaml"
TINY_DS = REPO / "hpc" / "pretrain" / "tiny_deepspeed.yaml"
PROFILE = "localslurm2"


def run_cmd(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=cluster_env(**env), cwd=REPO, check=False)  # fmt: skip


def common_overrides(shards: Path, run: Path, steps: int, every: int) -> list[str]:
    return [f"data.shards={shards}", f"train.run_dir={run}", f"train.steps={steps}",
            "train.log_every=1", f"checkpoint.every_steps={every}", "checkpoint.keep_last=0",
            "train.comm_timeout_s=60"]  # fmt: skip


def submit(config: Path, shards: Path, run: Path, steps: int, every: int, *extra: str,
           wait: bool = True) -> dict[str, Any]:
    """`satfuse submit pretrain --cluster localslurm2` (2 nodes x 1 task); its JSON output."""
    cmd = [str(PYTHON), "-m", "satfuse.cli", "submit", "pretrain", "--config", str(config),
           "--cluster", PROFILE, *common_overrides(shards, run, steps, every), *extra]
    if wait:
        cmd.append("--wait")
    res = run_cmd(cmd)
    assert res.returncode == 0, f"submit failed ({res.returncode}):\n{res.stderr[-4000:]}"
    return json.loads(res.stdout)  # fmt: skip


def one_node(config: Path, shards: Path, run: Path, steps: int, every: int, *extra: str) -> str:
    """The same training as 1 node x 2 ranks (`satfuse pretrain --nproc-per-node 2`, torchrun
    on this machine, free port); returns stderr (rank 0's log)."""
    cmd = [str(PYTHON), "-m", "satfuse.cli", "pretrain", "--nproc-per-node", "2", "--config",
           str(config), *common_overrides(shards, run, steps, every), *extra]
    res = run_cmd(cmd, DS_ACCELERATOR="cpu")
    assert res.returncode == 0, f"1-node run failed ({res.returncode}):\n{res.stderr[-4000:]}"
    return res.stderr  # fmt: skip


def losses(run: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a step logged twice must have the same loss twice)."""
    out: dict[int, float] = {}
    for line in filter(None, (run / "metrics.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        if "loss" not in rec:
            continue
        step, loss = int(rec["step"]), float(rec["loss"])
        assert out.get(step, loss) == loss, f"step {step} logged twice with different losses"
        out[step] = loss
    return out


def logged_steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [r["step"] for r in map(json.loads, filter(None, lines)) if "loss" in r]


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def task_log(run: Path, job_id: str, task: int, stream: str = "err") -> str:
    return (run / "submitit" / f"{job_id}_{task}_log.{stream}").read_text()


def task_hosts(run: Path, job_id: str, tasks: int = 2) -> list[set[str]]:
    """The hostnames submitit's JobEnvironment reported per task (one entry per attempt)."""
    hosts = []
    for t in range(tasks):
        text = task_log(run, job_id, t, "out")
        hosts.append({tok.split("=", 1)[1].rstrip(",") for tok in text.split() if tok.startswith("hostname=")})
    return hosts


def squeue_state(job_id: str) -> str:
    res = run_cmd(["squeue", "-h", "-j", job_id, "-o", "%T %r"], timeout=30)
    return res.stdout.strip() if res.returncode == 0 else ""


def scontrol_field(job_id: str, key: str) -> str:
    res = run_cmd(["scontrol", "show", "job", "-o", job_id], timeout=30)
    for tok in res.stdout.split():
        k, _, v = tok.partition("=")
        if k == key:
            return v
    return ""


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_gone(job_id: str, timeout: float = 240) -> int:
    """Wait until the job left the queue, releasing the ~2 min BeginTime hold after a requeue
    (not at once: slurmd refuses a start within the second of the requeue). Returns how many
    holds were seen (= requeues observed)."""
    deadline, holds, gone, held_since = time.monotonic() + timeout, 0, 0, 0.0
    while time.monotonic() < deadline:
        state = squeue_state(job_id)
        if "BeginTime" not in state:
            held_since = 0.0
        elif not held_since:
            held_since, holds = time.monotonic(), holds + 1
        elif time.monotonic() - held_since > 3:
            run_cmd(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
        gone = gone + 1 if not state else 0
        if gone >= 3:
            return holds
        time.sleep(0.5)
    run_cmd(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id} still queued after {timeout}s: {squeue_state(job_id)}")
