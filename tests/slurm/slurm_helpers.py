"""Shared helpers of the launch tests: run the CLI in-process, watch jobs with squeue."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from satfuse.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "hpc" / "pretrain" / "tiny.yaml")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `satfuse ARGV` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, f"satfuse {' '.join(argv)} -> {rc}\n{err[-3000:]}"
    return json.loads(out)


def squeue(job_id: str | None = None) -> list[str]:
    cmd = ["squeue", "-h", "-r", "-o", "%i %T %r"] + (["-j", job_id] if job_id else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    return [ln for ln in res.stdout.splitlines() if ln.strip()]


def queued_ids() -> set[str]:
    return {ln.split()[0] for ln in squeue()}


def job_state(job_id: str) -> str:
    """'' when SLURM no longer lists the job as pending/running."""
    res = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T %r"], capture_output=True, text=True,
                         timeout=30, check=False)
    for ln in res.stdout.splitlines():
        parts = ln.split(None, 1)
        if parts and parts[0] == job_id:
            return parts[1] if len(parts) > 1 else ""
    return ""


def wait_gone(job_id: str, timeout: float = 240) -> int:
    """Wait until the job left the queue; release requeued jobs held ~2 min in BeginTime.

    Returns how many times the job was seen waiting in BeginTime (requeues observed).
    """
    deadline, begin_waits, gone, held_since = time.time() + timeout, 0, 0, 0.0
    while time.time() < deadline:
        state = job_state(job_id)
        if "BeginTime" not in state:
            held_since = 0.0
        elif not held_since:
            held_since, begin_waits = time.time(), begin_waits + 1
        elif time.time() - held_since > 3:
            # not at once: a start within the second of the requeue is refused by slurmd
            # ("Job credential revoked": revocation has 1 s resolution) and the job FAILS
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                           capture_output=True, timeout=30, check=False)
        gone = gone + 1 if not state else 0
        if gone >= 3:
            return begin_waits
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)
    raise AssertionError(f"job {job_id} still queued after {timeout}s: {job_state(job_id)}")


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []


def scontrol_field(job_id: str, key: str) -> str:
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         timeout=30, check=False)
    for tok in res.stdout.split():
        k, _, v = tok.partition("=")
        if k == key:
            return v
    return ""
