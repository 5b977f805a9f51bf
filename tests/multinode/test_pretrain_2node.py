"""Pretraining on the 2-node cluster: DDP across two hosts via `srun -N2 -n2 satfuse pretrain`
(rendezvous from SLURM variables only), a node whose rank dies mid-job (fails fast, names the
node, the last complete checkpoint resumes), and a 2-node checkpoint resumed on 1 node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO, cluster_env

pytestmark = pytest.mark.multinode

PYTHON = REPO / ".venv" / "bin" / "python"
CONFIG = REPO / "hpc" / "pretrain" / "tiny.yaml"


def pretrain_cmd(nodes: int, shards: Path, run: Path, steps: int, every: int) -> list[str]:
    return [
        "srun", f"-N{nodes}", f"-n{nodes}", str(PYTHON), "-m", "satfuse.cli", "pretrain",
        "--config", str(CONFIG), f"data.shards={shards}", f"train.run_dir={run}",
        f"train.steps={steps}", "train.log_every=1", f"checkpoint.every_steps={every}",
        "train.comm_timeout_s=60",
    ]  # fmt: skip


def srun_pretrain(
    nodes: int, shards: Path, run: Path, steps: int, every: int = 3
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pretrain_cmd(nodes, shards, run, steps, every),
        capture_output=True, text=True, timeout=240, env=cluster_env(), cwd=REPO, check=False,
    )  # fmt: skip


def loss_steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, filter(None, lines)) if "loss" in r]


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_ddp_pretraining_across_two_nodes_then_resume_on_one(
    multinode_cluster: Path, sen12ms_shards: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    res = srun_pretrain(2, sen12ms_shards, run, steps=6)
    assert res.returncode == 0, res.stderr[-4000:]
    # rank 0 logs the layout (other ranks log warnings only): 2 nodes, master on sfnode1
    assert "rank 0/2 (local 0, node 0/2) master sfnode1:" in res.stderr
    assert loss_steps(run) == list(range(1, 7))
    ck = latest(run)
    assert (
        ck.name.endswith("6")
        and (ck / "rank_00000.pt").exists()
        and (ck / "rank_00001.pt").exists()
    )
    res = srun_pretrain(1, sen12ms_shards, run, steps=9)  # the 2-node checkpoint on 1 node
    assert res.returncode == 0, res.stderr[-4000:]
    assert loss_steps(run) == list(range(1, 10))  # continued at 7, no step repeated


def _rank_pid_in(namespace: str, run: Path) -> int | None:
    out = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    )
    for pid in out.stdout.split():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "satfuse.cli pretrain" in cmd and str(run) in cmd:
            return int(pid)
    return None


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "checkpoints" / "latest").exists() and loss_steps(run)[-1:] >= [5]:
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"job ended early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}"
            )
        time.sleep(0.2)
    raise AssertionError("no checkpoint within the timeout")


@pytest.mark.slow
def test_node_dying_mid_job_fails_fast_and_resumes(
    multinode_cluster: Path, sen12ms_shards: Path, tmp_path: Path
) -> None:
    """SIGKILL the rank on sfnode2: the job ends well before the 60 s peer timeout, SLURM's
    error names sfnode2, the last checkpoint is complete and a 1-node run resumes from it."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        pretrain_cmd(2, sen12ms_shards, run, steps=400, every=2),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster_env(), cwd=REPO,
    )  # fmt: skip
    try:
        _wait_for_checkpoint(run, proc)
        pid = _rank_pid_in("sfnode2", run)
        assert pid is not None, "no pretraining rank found in namespace sfnode2"
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert elapsed < 30, f"job took {elapsed:.1f}s to fail after the node's rank died"
    assert "sfnode2: task 1: Killed" in err, err[-4000:]
    ck = latest(run)
    assert (ck / "rank_00000.pt").exists() and (ck / "rank_00001.pt").exists()
    done = int(ck.name.split("_")[1])
    assert 2 <= done < 400
    res = srun_pretrain(1, sen12ms_shards, run, steps=done + 2, every=2)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resumed from" in res.stderr
    assert loss_steps(run)[-2:] == [done + 1, done + 2]
