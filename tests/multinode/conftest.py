"""The 2-node SLURM cluster (network namespaces) for the multinode tests.

The session fixture starts `slurm/local-cluster/multinode.sh` unless a healthy one is
already running, and stops it at the end only if it started it here (another session,
or a developer, may be using it). It fails loudly, with the script's reason, when the
cluster cannot be started: a multinode test that silently skips proves nothing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from satfuse.bench.commbytes import DROP_ENV

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local-cluster" / "multinode.sh"
BASE = Path(os.environ.get("SATFUSE_SLURM2_BASE", "/tmp/satfuse-slurm2"))
CONF = BASE / "slurm.conf"
NODES = ("sfnode1", "sfnode2")


def run_script(command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=timeout, check=False
    )


def cluster_env(**extra: str) -> dict[str, str]:
    """This process's environment pointed at the 2-node cluster (no leaked rank variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROP_ENV)}
    env.update(SLURM_CONF=str(CONF), OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="session")
def multinode_cluster() -> Iterator[Path]:
    """SLURM_CONF of a running 2-node cluster."""
    started_here = run_script("status", timeout=60).returncode != 0
    if started_here:
        res = run_script("start")
        if res.returncode != 0:
            pytest.fail(
                f"could not start the 2-node cluster with {SCRIPT} start (rc {res.returncode}):\n"
                f"{res.stderr[-3000:]}",
                pytrace=False,
            )
    yield CONF
    if started_here:
        run_script("stop", timeout=120)


REFERENCE_STEPS = 40
REFERENCE_EVERY = 4


@pytest.fixture(scope="session")
def reference_run(sen12ms_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 1-node run (1 node x 2 ranks, torchrun here) of the tiny Dual-SimCLR:
    REFERENCE_STEPS steps, every loss logged, a checkpoint every REFERENCE_EVERY steps, all
    kept. Every 2-node run (same world size, same global batch) must reproduce its losses."""
    from .helpers import TINY, one_node

    run = tmp_path_factory.mktemp("reference") / "run"
    one_node(TINY, sen12ms_shards, run, REFERENCE_STEPS, REFERENCE_EVERY)
    return run
