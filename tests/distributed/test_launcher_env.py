"""satfuse.distributed.launcher_env: launchers checked in order, one port rule, no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from satfuse.distributed.launcher_env import torchrun_vars, world_info_from_env
from satfuse.distributed.ports import port_from_job_id

SLURM = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "solo", "SLURM_TASKS_PER_NODE": "2"}
LOCAL = {"SUBMITIT_LOCAL_JOB_ID": "4321", "SUBMITIT_LOCAL_GLOBALID": "2", "SUBMITIT_LOCAL_LOCALID": "2",
         "SUBMITIT_LOCAL_NTASKS": "3", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}


@pytest.fixture(autouse=True)
def _no_scontrol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # the pure-python node list parser


def test_port_adds_the_requeue_count_on_slurm() -> None:
    """One port rule everywhere: job id + requeue count (SLURM_RESTART_COUNT), so a requeued
    job does not meet its previous attempt's port; before, srun jobs ignored the count."""
    first = world_info_from_env(SLURM)
    again = world_info_from_env({**SLURM, "SLURM_RESTART_COUNT": "2"})
    assert first.master_port == port_from_job_id("1234", 0)
    assert again.master_port == port_from_job_id("1234", 2) != first.master_port
    assert world_info_from_env(SLURM, restart=2).master_port == again.master_port


def test_submitit_local_executor() -> None:
    info = world_info_from_env(LOCAL, restart=1)
    assert (info.rank, info.local_rank, info.world_size, info.num_nodes) == (2, 2, 3, 1)
    assert (info.master_addr, info.master_port, info.source) == ("127.0.0.1", port_from_job_id("4321", 1),
                                                                 "submitit_local")


@pytest.mark.parametrize(("environ", "source"), [
    ({**SLURM, **LOCAL, "RANK": "0", "WORLD_SIZE": "1"}, "torchrun"),
    ({**SLURM, **LOCAL}, "submitit_local"),  # a local job started inside an allocation
    (SLURM, "slurm"),
    ({}, "single"),
])
def test_launchers_checked_in_order(environ: dict, source: str) -> None:
    assert world_info_from_env(environ).source == source


def test_torchrun_vars_round_trip() -> None:
    """What the submitit task exports is read back unchanged as torchrun's layout."""
    info = world_info_from_env(SLURM)
    back = world_info_from_env(torchrun_vars(info))
    assert {**back.as_dict(), "source": "slurm"} == info.as_dict()


def test_importable_without_torch() -> None:
    """The launcher reader runs where torch is not importable (a login node's python)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import satfuse.distributed.launcher_env as m\n"
            "print(m.world_info_from_env({}).source)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "single"
