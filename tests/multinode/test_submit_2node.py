"""`satfuse submit pretrain` and the plain `slurm/pretrain.sbatch` as real 2-node jobs (one rank
per node, namespaces sfnode1/sfnode2): ranks on both nodes, the global loss gathered across
them (bitwise equal to 1 node x 2 ranks with the same global batch), sharded checkpoints
written by both nodes into the shared run directory, DeepSpeed ZeRO-1, preemption ->
requeue -> resume to the uninterrupted result, and checkpoints moving 2 nodes <-> 1 node."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from satfuse.checkpoint.layout import checkpoint_problems, read_meta

from .conftest import NODES, REFERENCE_STEPS, REPO, cluster_env
from .helpers import (
    SATFUSE,
    TINY,
    TINY_DS,
    common_overrides,
    logged_steps,
    losses,
    one_node,
    scontrol_field,
    step_dir,
    submit,
    task_hosts,
    task_log,
    wait_for,
    wait_gone,
)

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


def assert_two_node_job(run: Path, job_id: str) -> None:
    """Task 0 ran on sfnode1, task 1 on sfnode2, over the configured interface."""
    assert task_hosts(run, job_id) == [{NODES[0]}, {NODES[1]}]
    log = task_log(run, job_id, 0)
    assert "joining process group: rank 0/2 (local 0, node 0/2) master sfnode1:" in log
    assert "using network interface eth1" in log


def assert_sharded_dcp(ck: Path) -> None:
    """A complete DDP checkpoint with the parts of both ranks (= both nodes)."""
    assert checkpoint_problems(ck) == []
    meta = read_meta(ck)
    assert meta["world_size"] == 2
    names = {p.name for p in ck.iterdir()}
    assert {"rank_00000.pt", "rank_00001.pt", "__0_0.distcp", "__1_0.distcp"} <= names


def test_ddp_two_nodes_equals_one_node_and_checkpoints_move_both_ways(
    multinode_cluster: Path, sen12ms_shards: Path, reference_run: Path, tmp_path: Path
) -> None:
    ref = losses(reference_run)
    # 2 nodes, steps 1-4: the same losses as 1 node x 2 ranks, bit for bit
    two = tmp_path / "two"
    out = submit(TINY, sen12ms_shards, two, 4, 4)
    assert out["results"] == [[0, 0]]
    job = out["jobs"][0]["job_id"]
    assert_two_node_job(two, job)
    assert losses(two) == {s: ref[s] for s in range(1, 5)}
    assert_sharded_dcp(step_dir(two, 4))
    # that 2-node checkpoint resumes on 1 node (2 ranks) and continues exactly
    err = one_node(TINY, sen12ms_shards, two, 8, 4)
    assert "resumed from" in err and "at step 4" in err
    assert losses(two) == {s: ref[s] for s in range(1, 9)}
    # the reverse: the 1-node run's step-4 checkpoint resumes on 2 nodes and continues exactly
    rev = tmp_path / "rev"
    out = submit(TINY, sen12ms_shards, rev, 8, 4, f"checkpoint.resume={step_dir(reference_run, 4)}")
    assert out["results"] == [[0, 0]]
    job = out["jobs"][0]["job_id"]
    assert_two_node_job(rev, job)
    assert "at step 4 (saved by 2 ranks, now 2)" in task_log(rev, job, 0)
    assert losses(rev) == {s: ref[s] for s in range(5, 9)}
    assert_sharded_dcp(step_dir(rev, 8))


@pytest.mark.deepspeed
def test_deepspeed_zero1_two_nodes_equals_one_node_and_resumes_on_one(
    multinode_cluster: Path, sen12ms_shards: Path, tmp_path: Path
) -> None:
    ref_run = tmp_path / "ref"
    one_node(TINY_DS, sen12ms_shards, ref_run, 6, 2)
    ref = losses(ref_run)
    two = tmp_path / "two"
    out = submit(TINY_DS, sen12ms_shards, two, 4, 2)
    assert out["results"] == [[0, 0]]
    job = out["jobs"][0]["job_id"]
    assert_two_node_job(two, job)
    assert "DeepSpeed engine: ZeRO stage 1, fp32, 2 rank(s)" in task_log(two, job, 0)
    assert losses(two) == {s: ref[s] for s in range(1, 5)}
    ck = step_dir(two, 4)
    assert checkpoint_problems(ck) == []
    meta = read_meta(ck)
    assert meta["kind"] == "deepspeed" and meta["world_size"] == 2
    names = {p.name for p in ck.iterdir()}  # ZeRO-1: each node wrote its optimizer partition
    assert {"rank_00000.pt", "rank_00001.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names  # fmt: skip
    err = one_node(TINY_DS, sen12ms_shards, two, 6, 2)  # the 2-node checkpoint on 1 node
    assert "resumed from" in err and "at step 4" in err
    assert losses(two) == {s: ref[s] for s in range(1, 7)}


def test_preempted_two_node_job_saves_on_both_nodes_and_resumes_to_the_same_end(
    multinode_cluster: Path, sen12ms_shards: Path, reference_run: Path, tmp_path: Path
) -> None:
    """USR2 (what SLURM sends before the time limit or on preemption) mid-run: both ranks save
    one checkpoint together, rank 0 requeues, the job restarts on both nodes from it and ends
    with exactly the uninterrupted run's steps and losses."""
    run = tmp_path / "run"
    out = submit(TINY, sen12ms_shards, run, REFERENCE_STEPS, 1000, wait=False)
    job = out["jobs"][0]["job_id"]
    wait_for(lambda: len(logged_steps(run)) >= 3, 180, "the 2-node job to train a few steps")
    env = cluster_env()
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30, env=env)
    assert wait_gone(job, timeout=300) >= 1
    assert scontrol_field(job, "Restarts") == "1"
    assert scontrol_field(job, "JobState") == "COMPLETED"
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert len(saved) == 2 and saved[-1] == f"step_{REFERENCE_STEPS:08d}"
    stop = int(saved[0].split("_")[1])
    assert 3 <= stop < REFERENCE_STEPS
    assert_sharded_dcp(step_dir(run, stop))  # both nodes saved the preemption checkpoint
    for task in (0, 1):  # the stop reached both nodes' ranks, each saved and left
        assert f"stop signal received: saved step {stop};" in task_log(run, job, task)
    assert task_hosts(run, job) == [{NODES[0]}, {NODES[1]}]  # both attempts on both nodes
    log0 = task_log(run, job, 0)
    assert "attempt 2" in log0 and f"at step {stop} (saved by 2 ranks, now 2)" in log0
    assert "SatfuseError" not in log0
    assert sorted(set(logged_steps(run))) == list(range(1, REFERENCE_STEPS + 1))
    assert losses(run) == losses(reference_run)  # same steps, same losses, bit for bit


def test_plain_sbatch_template_as_a_two_node_job(
    multinode_cluster: Path, sen12ms_shards: Path, reference_run: Path, tmp_path: Path
) -> None:
    """`sbatch --nodes=2 slurm/pretrain.sbatch`: srun starts one rank per node, rendezvous
    from SLURM variables only; preempted with USR2, the script requeues itself, the job
    resumes and reproduces the uninterrupted run."""
    run = tmp_path / "run"
    env = cluster_env(CONFIG=str(TINY), SATFUSE=str(SATFUSE), SATFUSE_IFNAME="eth1")
    cmd = ["sbatch", "--parsable", "--partition=p", "--nodes=2", "--ntasks-per-node=1",
           "--time=30", f"--output={tmp_path}/job-%j.out", str(REPO / "slurm" / "pretrain.sbatch"),
           *common_overrides(sen12ms_shards, run, REFERENCE_STEPS, 1000)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    wait_for(lambda: len(logged_steps(run)) >= 3, 180, "the template job to train a few steps")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30, env=env)
    assert wait_gone(job, timeout=300) >= 1
    assert scontrol_field(job, "Restarts") == "1"
    assert scontrol_field(job, "JobState") == "COMPLETED"
    log = (tmp_path / f"job-{job}.out").read_text()
    assert f"job {job} attempt 1 on sfnode[1-2]" in log and f"job {job} attempt 2 on sfnode[1-2]" in log
    assert "requeueing job" in log
    assert "rank 0/2 (local 0, node 0/2) master sfnode1:" in log
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert len(saved) == 2
    assert_sharded_dcp(step_dir(run, int(saved[0].split("_")[1])))
    assert_sharded_dcp(step_dir(run, REFERENCE_STEPS))
    assert sorted(set(logged_steps(run))) == list(range(1, REFERENCE_STEPS + 1))
    assert losses(run) == losses(reference_run)
