"""Two SLURM nodes in network namespaces: distinct hostnames, a real gloo job across them via
`satfuse.distributed.env`, clear failures (wrong interface, a dead node), and a stop that
leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import BASE, NODES, REPO, cluster_env, run_script

pytestmark = pytest.mark.multinode

PYTHON = REPO / ".venv" / "bin" / "python"
WORKER = REPO / "tests" / "distributed" / "dist_worker.py"


def srun(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["srun", "-N2", "-n2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cluster_env(**env),
        cwd=REPO,
        check=False,
    )


def test_each_node_has_its_own_hostname(multinode_cluster: Path) -> None:
    res = srun("hostname")
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split()) == list(NODES)


def test_gloo_all_reduce_across_two_nodes(multinode_cluster: Path) -> None:
    res = srun(str(PYTHON), str(WORKER))
    assert res.returncode == 0, res.stderr[-3000:]
    out = sorted(
        (json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")),
        key=lambda r: r["rank"],
    )
    assert [r["rank"] for r in out] == [0, 1]
    assert [r["host"] for r in out] == list(NODES)  # ranks really on different nodes
    for r in out:
        e = r["env"]
        assert (e["source"], e["world_size"], e["num_nodes"], e["local_world_size"]) == (
            "slurm",
            2,
            2,
            1,
        )
        assert e["master_addr"] == "sfnode1"  # first host of the node list, never localhost
        assert r["sum"] == 3.0 and r["stop"] is True and r["world"] == 2
    assert [r["env"]["node_rank"] for r in out] == [0, 1]


def test_configured_interface_is_used(multinode_cluster: Path) -> None:
    res = srun(str(PYTHON), str(WORKER), SATFUSE_IFNAME="eth1")
    assert res.returncode == 0, res.stderr[-3000:]
    out = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(out) == 2 and all(r["gloo_ifname"] == "eth1" and r["sum"] == 3.0 for r in out)


def test_wrong_interface_fails_at_start_naming_it(multinode_cluster: Path) -> None:
    t0 = time.monotonic()
    res = srun(str(PYTHON), str(WORKER), SATFUSE_IFNAME="ib0", WORKER_TIMEOUT_S="30")
    assert res.returncode != 0
    assert time.monotonic() - t0 < 20  # before any connection attempt, not after the timeout
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("SatfuseError:")]
    assert len(lines) == 2, res.stderr[-3000:]
    for node in NODES:
        assert any(
            "network interface ib0" in ln and f"host {node}" in ln and "eth1" in ln for ln in lines
        )


def test_dead_node_fails_fast_naming_it(multinode_cluster: Path) -> None:
    """The rank on sfnode2 dies abruptly: the rank on sfnode1 stops at once by itself (no
    srun --kill-on-bad-exit, no timeout), with a one-line error naming sfnode2."""
    t0 = time.monotonic()
    res = srun(str(PYTHON), str(WORKER), WORKER_DIE_RANK="1", WORKER_TIMEOUT_S="60")
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert elapsed < 20, f"took {elapsed:.1f}s, the peer timeout is 60s"
    assert "sfnode2: task 1: Exited with exit code 9" in res.stderr, res.stderr[-3000:]
    assert "sfnode1: task 0: Exited with exit code 3" in res.stderr, res.stderr[-3000:]
    lost = [ln for ln in res.stderr.splitlines() if ln.startswith("SatfuseError:")]
    assert len(lost) == 1, res.stderr[-3000:]
    assert "rank 0 on host sfnode1" in lost[0] and "peer node sfnode2 (10.77.0.2)" in lost[0]


def test_start_twice_reuses_the_running_cluster(multinode_cluster: Path) -> None:
    before = (BASE / "run" / "pids").read_text()
    res = run_script("start", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "reusing it" in res.stderr
    assert (BASE / "run" / "pids").read_text() == before
    assert run_script("status", timeout=60).returncode == 0
