"""The real local SLURM cluster for the launch tests.

`slurm_cluster` (session) runs slurm/local-cluster/start.sh, which installs and starts
munged/slurmctld/slurmd if needed. If it cannot start, every test that needs it FAILS with
start.sh's reason (never a quiet skip: CI must not go green without having run them).
The cluster is stopped at the end only if this session started it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLUSTER_DIR = ROOT / "slurm" / "local-cluster"
BASE = Path(os.environ.get("SATFUSE_SLURM_BASE", "/tmp/satfuse-slurm"))


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """Path of the running cluster's slurm.conf."""
    already = (BASE / "run" / "pids").is_file()
    try:
        res = subprocess.run(["bash", str(CLUSTER_DIR / "start.sh")], capture_output=True, text=True,
                             timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"slurm/local-cluster/start.sh did not finish in {exc.timeout}s", pytrace=False)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        pytest.fail(f"the local SLURM cluster could not start (start.sh exit {res.returncode}):\n{tail}",
                    pytrace=False)
    conf = next((ln.split("=", 1)[1] for ln in res.stdout.splitlines() if ln.startswith("export SLURM_CONF=")), "")
    if not conf or not Path(conf).is_file():
        pytest.fail(f"start.sh did not print a usable SLURM_CONF line:\n{res.stdout}", pytrace=False)
    yield conf
    if not already:
        subprocess.run(["bash", str(CLUSTER_DIR / "stop.sh")], capture_output=True, timeout=120, check=False)


@pytest.fixture
def slurm_env(slurm_cluster: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """SLURM clients (and the jobs they submit: sbatch exports the environment) use the cluster."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster)
    return slurm_cluster


@pytest.fixture
def job_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs run from the repo root and can import the test trainer (tests.slurm.toy_train)."""
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *path]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)
