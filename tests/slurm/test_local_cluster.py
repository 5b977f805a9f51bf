"""slurm/local-cluster/start.sh and stop.sh: idempotent start, and stop ends exactly what it started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.slurm.conftest import BASE, CLUSTER_DIR

pytestmark = pytest.mark.slurm


def pids(base: Path) -> dict[str, int]:
    out = {}
    for line in (base / "run" / "pids").read_text().splitlines():
        key, _, value = line.partition("=")
        if value:
            out[key] = int(value)
    return out


def alive(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


def script(name: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER_DIR / name)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, check=False)


def test_start_twice_reuses_the_running_cluster(slurm_cluster: str) -> None:
    before = pids(BASE)
    res = script("start.sh")
    assert res.returncode == 0, res.stderr
    assert "already running" in res.stderr and f"export SLURM_CONF={slurm_cluster}" in res.stdout
    assert pids(BASE) == before


def test_second_cluster_stops_only_its_own_daemons(slurm_cluster: str, tmp_path: Path) -> None:
    env = {"SATFUSE_SLURM_BASE": str(tmp_path / "c2"), "SATFUSE_SLURMCTLD_PORT": "6857",
           "SATFUSE_SLURMD_PORT": "6858"}
    res = script("start.sh", env)
    try:
        assert res.returncode == 0, res.stderr
        conf = tmp_path / "c2" / "slurm.conf"
        assert f"export SLURM_CONF={conf}" in res.stdout
        mine = pids(tmp_path / "c2")
        assert alive(mine["SLURMCTLD_PID"], "slurmctld") and alive(mine["SLURMD_PID"], "slurmd")
        assert mine.get("MUNGED_PID") is None  # munged of the first cluster answers: reused
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30,
                               env={**os.environ, "SLURM_CONF": str(conf)})
        assert sinfo.stdout.split() == ["idle"]
    finally:
        stop = script("stop.sh", env)
    assert stop.returncode == 0, stop.stderr
    assert not alive(mine["SLURMCTLD_PID"], "slurmctld") and not alive(mine["SLURMD_PID"], "slurmd")
    first = pids(BASE)  # the session's cluster is untouched
    assert alive(first["SLURMCTLD_PID"], "slurmctld") and alive(first["SLURMD_PID"], "slurmd")
    again = script("stop.sh", env)  # safe to run twice
    assert again.returncode == 0 and "nothing to stop" in again.stderr
