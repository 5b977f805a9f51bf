"""satfuse.distributed.env and launcher_env: layout detection from launcher variables, interface checks, and
real 2-process gloo rendezvous (success and a dead peer) in subprocesses."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from satfuse.distributed import collectives as coll
from satfuse.distributed import env as denv
from satfuse.distributed import launcher_env as lenv
from satfuse.distributed.ports import free_port, port_from_job_id
from satfuse.utils import SatfuseError

WORKER = Path(__file__).with_name("dist_worker.py")

# ----------------------------------------------------------------------------------------------
# Node lists and task counts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("n1", ["n1"]),
        ("n1,n2", ["n1", "n2"]),
        ("n[1-2,5]", ["n1", "n2", "n5"]),
        ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
        ("a[1-2]-ib,b7", ["a1-ib", "a2-ib", "b7"]),
        ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
        ("node-3.cluster", ["node-3.cluster"]),
    ],
)
def test_parse_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert lenv.parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n1-2]", "n[a-b]", "n[5-2]", ""])
def test_parse_nodelist_rejects_bad_lists(bad: str) -> None:
    with pytest.raises(SatfuseError, match="node list"):
        lenv.parse_nodelist(bad)


def test_expand_nodelist_without_scontrol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert lenv.expand_nodelist("c[1-3]") == ["c1", "c2", "c3"]


def test_parse_tasks_per_node() -> None:
    assert lenv.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert lenv.parse_tasks_per_node("4") == [4]
    with pytest.raises(SatfuseError, match="tasks-per-node"):
        lenv.parse_tasks_per_node("2x3")


# ----------------------------------------------------------------------------------------------
# detect_env
# ----------------------------------------------------------------------------------------------


def test_single_process_without_launcher() -> None:
    e = denv.detect_env({}, backend="gloo")
    assert (e.rank, e.world_size, e.local_rank, e.source) == (0, 1, 0, "single")
    assert not e.is_distributed


def test_torchrun_variables() -> None:
    e = denv.detect_env(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "1",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "29401",
        },
        backend="gloo",
    )
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (5, 8, 1, 4)
    assert (e.node_rank, e.num_nodes, e.master_addr, e.master_port) == (1, 2, "node7", 29401)
    assert (e.source, e.backend, e.device) == ("torchrun", "gloo", "cpu")


def test_torchrun_wins_over_slurm() -> None:
    e = denv.detect_env(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "h1",
            "SLURM_PROCID": "0",
            "SLURM_STEP_ID": "0",
        },
        backend="gloo",
    )
    assert (e.source, e.rank) == ("torchrun", 1)


def test_nccl_device_follows_local_rank() -> None:
    e = denv.detect_env(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h"}, "nccl"
    )
    assert e.device == "cuda:3"


def _slurm(**extra: str) -> dict[str, str]:
    base = {
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NODELIST": "solo",
        "SLURM_JOB_NUM_NODES": "1",
    }
    base.update(extra)
    return base


def test_slurm_single_node_two_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # the pure-python node list parser
    e = denv.detect_env(
        _slurm(SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="2"),
        backend="gloo",
    )
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (1, 2, 1, 2)
    assert (e.master_addr, e.num_nodes, e.source) == ("solo", 1, "slurm")
    assert e.master_port == port_from_job_id("1234") == 21234


def test_slurm_multi_node_master_is_first_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    e = denv.detect_env(
        _slurm(
            SLURM_PROCID="5",
            SLURM_LOCALID="1",
            SLURM_NODEID="2",
            SLURM_NTASKS="7",
            SLURM_TASKS_PER_NODE="2(x3),1",
            SLURM_JOB_NODELIST="gpu[07-10]",
            SLURM_JOB_NUM_NODES="4",
            SLURM_JOB_ID="987654",
        ),
        backend="gloo",
    )
    assert (e.rank, e.world_size, e.local_rank, e.node_rank) == (5, 7, 1, 2)
    assert (e.local_world_size, e.num_nodes, e.master_addr) == (2, 4, "gpu07")
    assert e.master_port == 20000 + 987654 % 12000


def test_slurm_step_values_win_over_job_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """`srun -N1 -n2` inside a 3-node allocation: the step's nodes and task count decide."""
    monkeypatch.setenv("PATH", "/nonexistent")
    e = denv.detect_env(
        _slurm(
            SLURM_NTASKS="6",
            SLURM_JOB_NODELIST="n[1-3]",
            SLURM_JOB_NUM_NODES="3",
            SLURM_STEP_NODELIST="n3",
            SLURM_STEP_NUM_NODES="1",
            SLURM_STEP_NUM_TASKS="2",
            SLURM_STEP_TASKS_PER_NODE="2",
        ),
        backend="gloo",
    )
    assert (e.world_size, e.num_nodes, e.master_addr, e.local_world_size) == (2, 1, "n3", 2)


def test_slurm_explicit_master_port_and_addr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    e = denv.detect_env(
        _slurm(SLURM_NTASKS="2", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_NUM_NODES="2",
               MASTER_PORT="31000", MASTER_ADDR="n2-ib"),
        backend="gloo",
    )  # fmt: skip
    assert (e.master_addr, e.master_port) == ("n2-ib", 31000)


@pytest.mark.parametrize("addr", ["localhost", "127.0.0.1"])
def test_slurm_multi_node_refuses_loopback_master(
    monkeypatch: pytest.MonkeyPatch, addr: str
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    env = _slurm(SLURM_NTASKS="2", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_NUM_NODES="2")
    env["MASTER_ADDR"] = addr
    with pytest.raises(SatfuseError, match=r"loopback.*spans 2 nodes.*first host, n1"):
        denv.detect_env(env, backend="gloo")


def test_slurm_batch_shell_without_step_is_single_process() -> None:
    """The batch script itself (no srun step) is one process, whatever --ntasks says."""
    env = _slurm(SLURM_NTASKS="4")
    del env["SLURM_STEP_ID"]
    assert denv.detect_env(env, backend="gloo").world_size == 1


def test_bad_integer_names_the_variable() -> None:
    with pytest.raises(SatfuseError, match="SLURM_NTASKS='two'"):
        denv.detect_env(_slurm(SLURM_NTASKS="two"), backend="gloo")


def test_unknown_backend() -> None:
    with pytest.raises(SatfuseError, match="unknown backend 'tpu'"):
        denv.resolve_backend("tpu")


# ----------------------------------------------------------------------------------------------
# Interface
# ----------------------------------------------------------------------------------------------


def test_wrong_interface_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("SATFUSE_IFNAME", "ib-nope0")
    with pytest.raises(SatfuseError) as info:
        denv.init_distributed(timeout_s=5)
    msg = str(info.value)
    assert "ib-nope0" in msg and "SATFUSE_IFNAME" in msg and "lo" in msg
    assert "GLOO_SOCKET_IFNAME" not in os.environ


def test_existing_interface_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SATFUSE_IFNAME", raising=False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    assert "lo" in denv.list_interfaces()
    assert denv.configure_interface("lo") == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"


def test_world_one_creates_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SATFUSE_IFNAME"):
        monkeypatch.delenv(key, raising=False)
    e = denv.init_distributed(timeout_s=5)
    try:
        assert e.world_size == 1 and not dist.is_initialized()
        assert denv.init_distributed() is e  # idempotent
        assert (coll.rank(), coll.world(), coll.is_main()) == (0, 1, True)
        assert coll.any_rank(True) is True and coll.any_rank(False) is False
        coll.barrier()
    finally:
        denv.teardown()


def test_exported_layout_reads_back_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the rendezvous exports torchrun-style variables, a later `world_info_from_env`
    (staging, a subprocess) still sees this rank's node, not node 0."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # _export writes here; undone after the test
    env = denv.DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1,
                       master_addr="sfnode1", master_port=21000, num_nodes=2, source="slurm")
    denv._export(env)
    back = lenv.world_info_from_env()
    assert (back.rank, back.local_rank, back.node_rank, back.num_nodes, back.world_size) == (3, 1, 1, 2, 4)


def test_teardown_leaves_a_multi_rank_group_to_the_exit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Destroying a multi-rank gloo group can deadlock against its own worker threads (see
    `teardown`); with several ranks teardown must not call it (the process exits right after).

    The fake records its calls rather than raising: teardown logs and swallows any exception
    from the destroy, so a raising fake would let a teardown that destroys pass."""
    import torch.distributed as dist

    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *_a, **_k: 2)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **_k: calls.append(a))
    with caplog.at_level(logging.WARNING):
        denv.teardown()
    assert calls == [], "destroy_process_group called with 2 ranks"
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # nothing was attempted


def test_teardown_destroys_a_one_rank_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """One rank (DeepSpeed's private group): destroyed, so the process can train again."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    denv.teardown()
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------------------------
# Real 2-process rendezvous
# ----------------------------------------------------------------------------------------------


def _spawn(rank: int, world: int, port: int, timeout_s: int, **extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SATFUSE_"))}
    env.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORKER_TIMEOUT_S=str(timeout_s),
        OMP_NUM_THREADS="1", **extra,
    )  # fmt: skip
    return subprocess.Popen(
        [sys.executable, str(WORKER)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_process_gloo_all_reduce() -> None:
    port = free_port()
    procs = [_spawn(r, 2, port, 60, SATFUSE_IFNAME="lo") for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    res = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [r["rank"] for r in res] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["stop"] is True for r in res)
    assert [r["is_main"] for r in res] == [True, False]
    assert all(r["gloo_ifname"] == "lo" and r["env"]["source"] == "torchrun" for r in res)


@pytest.mark.parametrize("present_rank", [0, 1])
def test_dead_peer_fails_within_timeout(present_rank: int) -> None:
    """One rank never joins: the other fails after ~timeout_s with a message naming rank/host."""
    timeout_s = 3
    t0 = time.monotonic()
    p = _spawn(present_rank, 2, free_port(), timeout_s)
    _, err = p.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert p.returncode == 2, err[-2000:]
    msg = [ln for ln in err.splitlines() if ln.startswith("SatfuseError:")]
    assert msg, err[-2000:]
    assert f"rank {present_rank}/2 on host {socket.gethostname()}" in msg[0]
    assert f"within {timeout_s}s" in msg[0] and "every node" in msg[0]
    assert elapsed < 30, f"took {elapsed:.1f}s for a {timeout_s}s timeout"
