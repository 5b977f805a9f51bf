"""One writer per run_dir across nodes: a second SLURM job on another node refuses a run_dir
whose lease a running job holds (naming it), and takes it over once that job is gone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO, cluster_env
from .test_pretrain_2node import pretrain_cmd

pytestmark = pytest.mark.multinode


def _metrics_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(ln).get("step", 0) for ln in lines if ln.strip()), default=0)


def test_second_job_on_another_node_refuses_then_takes_over(
    multinode_cluster: Path, sen12ms_shards: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    holder: dict = {}
    first = subprocess.Popen(
        ["srun", "-N1", "-n1", "-w", "sfnode1", *pretrain_cmd(1, sen12ms_shards, run, 5000, 3)[3:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while _metrics_step(run) < 2:
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "first job made no progress"
            time.sleep(0.2)
        holder.update(json.loads((run / ".lock").read_text()))
        assert holder["slurm_job"]
        second = subprocess.run(
            ["srun", "-N1", "-n1", "-w", "sfnode2", *pretrain_cmd(1, sen12ms_shards, run, 6, 3)[3:]],
            capture_output=True, text=True, timeout=240, env=cluster_env(), cwd=REPO, check=False)
        assert second.returncode != 0
        assert "another run is writing" in second.stderr and f"SLURM job {holder['slurm_job']}" in second.stderr
        assert first.poll() is None  # the holder trains on
    finally:
        if holder:  # the rank dies hard: its lease stays behind, as after a node crash
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(holder["pid"]), signal.SIGKILL)
        first.wait(timeout=120)
    assert (run / ".lock").exists()
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "-j", holder["slurm_job"]], capture_output=True, text=True,
                         env=cluster_env(), check=False).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    steps = _metrics_step(run)
    third = subprocess.run(
        ["srun", "-N1", "-n1", "-w", "sfnode2", *pretrain_cmd(1, sen12ms_shards, run, steps + 2, 3)[3:]],
        capture_output=True, text=True, timeout=240, env=cluster_env(), cwd=REPO, check=False)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the lease" in third.stderr and f"SLURM job {holder['slurm_job']}" in third.stderr
    assert not (run / ".lock").exists()
