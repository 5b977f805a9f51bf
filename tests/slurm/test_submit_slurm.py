"""`satfuse submit` against the real local SLURM cluster (slurm/local-cluster/start.sh).

The launch machinery is exercised for real: submitit writes and sbatch queues the job, srun
starts the tasks, torch.distributed (gloo) joins them from `JobEnvironment`, SLURM delivers
the stop signal and requeues. The trainer here is `toy_train` (same contract as the real one,
no data); `test_real_trainer.py` runs the real `run_pretrain`.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.slurm_helpers import (
    ROOT,
    TINY,
    cli,
    cli_json,
    job_state,
    metrics,
    queued_ids,
    scontrol_field,
    wait_for,
    wait_gone,
)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_env", "job_env")]
TOY = "tests.slurm.toy_train:run"


def submit_toy(capsys: pytest.CaptureFixture[str], run_dir: Path, *extra: str, steps: int = 8,
               flags: tuple[str, ...] = ()) -> str:
    out = cli_json(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm", *flags,
                   "--entry", TOY, f"train.run_dir={run_dir}", f"train.steps={steps}", *extra)
    assert out["executor"] == "slurm" and len(out["jobs"]) == 1
    return out["jobs"][0]["job_id"]


def final_state(run_dir: Path) -> dict:
    ck = run_dir / "checkpoints"
    return json.loads((ck / (ck / "latest").read_text().strip() / "state.json").read_text())


def test_dry_run_prints_a_valid_sbatch_script(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = queued_ids()
    rc, out, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm",
                       "--dry-run", f"train.run_dir={tmp_path / 'run'}")
    assert rc == 0, err
    assert out.startswith("#!/bin/bash") and "#SBATCH --requeue" in out and "#SBATCH --signal=USR2@120" in out
    assert "#SBATCH --ntasks-per-node=2" in out and "#SBATCH --partition=debug" in out
    assert "srun" in out and "submitit.core._submit" in out and "sbatch --test-only` only" in out
    script = tmp_path / "job.sh"
    script.write_text(out)
    res = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "to start at" in res.stderr
    assert not (tmp_path / "run" / "jobs.json").exists()
    assert queued_ids() == before  # nothing queued
    # given to sbatch anyway: it fails with a log that says why (not JobLaunchFailure and no log)
    res = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=1", str(script)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    wait_gone(job, timeout=120)
    assert scontrol_field(job, "JobState") == "FAILED" and scontrol_field(job, "ExitCode") == "2:0"
    assert "printed by satfuse submit --dry-run and cannot run" in (tmp_path / f"slurm-{job}.out").read_text()
    assert not (tmp_path / "run").exists()


def test_a_failing_setup_line_fails_the_job_and_says_which(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    """`module load nonexistent` (no `module` here: status 127) fails the job at that line;
    `jobs logs`, `ls` and `status` say which line (the outcome record; SLURM's own record
    goes after MinJobAge)."""
    prof = tmp_path / "setup.yaml"
    prof.write_text((ROOT / "hpc" / "clusters" / "localslurm.yaml").read_text()
                    + 'setup: ["true", "module load nonexistent", "echo never"]\n')
    run = tmp_path / "run"
    job = cli_json(capsys, "submit", "pretrain", "--config", TINY, "--cluster", str(prof), "--tasks-per-node", "1",
                   "--entry", TOY, f"train.run_dir={run}", "train.steps=2")["jobs"][0]["job_id"]
    wait_gone(job, timeout=120)
    assert scontrol_field(job, "JobState") == "FAILED" and scontrol_field(job, "ExitCode") == "127:0"
    said = "profile setup line 2 failed with status 127: module load nonexistent; fix setup: in the cluster profile"
    rc, out, _ = cli(capsys, "jobs", "logs", str(run))
    assert rc == 0 and said in out
    assert "never" not in (run / "submitit" / f"{job}_0_log.out").read_text() and not metrics(run)
    status = cli_json(capsys, "jobs", "status", str(run))
    assert status["jobs"][0]["state"] == "FAILED" and status["jobs"][0]["slurm"]["ExitCode"] == "127:0"
    assert status["jobs"][0]["error"] == "profile setup line 2 failed: module load nonexistent"
    rc, out, _ = cli(capsys, "jobs", "ls", str(run))
    assert rc == 0 and "FAILED" in out and "profile setup line 2 failed: module load nonexistent; see" in out


def test_bad_partition_fails_before_queueing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = queued_ids()
    rc, out, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm",
                       "--partition", "nosuchpart", f"train.run_dir={tmp_path}")
    assert rc == 2 and out == ""
    assert "partition 'nosuchpart' does not exist" in err and "debug" in err
    assert queued_ids() == before and not (tmp_path / "jobs.json").exists()


def test_profile_with_unknown_key_fails_before_queueing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prof = tmp_path / "typo.yaml"
    prof.write_text("executor: slurm\npartition: debug\ntasks_per_nod: 2\n")
    before = queued_ids()
    rc, out, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", str(prof),
                       f"train.run_dir={tmp_path / 'run'}")
    assert rc == 2 and out == ""
    assert "typo.yaml" in err and "unknown key tasks_per_nod" in err
    assert queued_ids() == before


def test_resources_slurm_refuses_fail_before_queueing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = queued_ids()
    rc, _, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm",
                     "--tasks-per-node", "64", f"train.run_dir={tmp_path}")
    assert rc == 2 and "SLURM would reject this job" in err
    assert queued_ids() == before


def test_two_task_job_runs_with_world_size_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = submit_toy(capsys, run, "checkpoint.every_steps=4", steps=8)
    wait_gone(job, timeout=120)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert {r["world"] for r in rows} == {2} and {r["reduced"] for r in rows} == {3.0}  # 1 + 2
    assert {p.name for p in (run / "checkpoints").glob("step_*")} == {"step_00000004", "step_00000008"}
    assert final_state(run)["step"] == 8
    # jobs ls / status / logs over the run's index
    rc, out, _ = cli(capsys, "jobs", "ls", str(run))
    assert rc == 0 and out.split()[:3] == [job, "pretrain", "slurm"] and "COMPLETED" in out
    status = cli_json(capsys, "jobs", "status", str(run))
    assert status["latest_checkpoint"] == "step_00000008" and status["jobs"][0]["state"] == "COMPLETED"
    rc, out, _ = cli(capsys, "jobs", "logs", str(run), "--task", "0")
    assert rc == 0 and "task rank 0/2" in out and "Job completed successfully" in out


def test_preempted_job_resumes_and_matches_uninterrupted(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    steps = 16
    monkeypatch.setenv("TOY_STEP_S", "0.25")
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    job_a = submit_toy(capsys, straight, steps=steps)
    job_b = submit_toy(capsys, preempted, "checkpoint.every_steps=100", steps=steps)
    wait_for(lambda: len(metrics(preempted)) >= 4, 90, "the job to make progress")
    subprocess.run(["scancel", "--signal=USR2", job_b], check=True, timeout=30)  # SLURM's pre-timeout signal
    requeues = wait_gone(job_b, timeout=240)
    wait_gone(job_a, timeout=120)
    assert requeues >= 1 and scontrol_field(job_b, "Restarts") == "1"
    rows = metrics(preempted)
    first = [r for r in rows if r["attempt"] == 0]
    second = [r for r in rows if r["attempt"] == 1]
    assert first and second, rows
    assert 4 <= first[-1]["step"] < steps  # stopped mid-run ...
    assert second[0]["step"] == first[-1]["step"] + 1  # ... resumed from the saved step
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert first[0]["port"] != second[0]["port"]  # fresh rendezvous port after requeue
    assert final_state(preempted) == final_state(straight) == {**final_state(straight), "step": steps}
    # logs of both attempts are in the same file (appended), in the same run dir
    log = (preempted / "submitit" / f"{job_b}_0_log.err").read_text()
    assert "attempt 1" in log and "attempt 2" in log and "requeued (requeue 1" in log


def test_requeue_limit_stops_with_a_clear_message(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOY_STEP_S", "0.25")
    run = tmp_path / "run"
    job = submit_toy(capsys, run, "train.max_requeues=0", steps=200)
    wait_for(lambda: len(metrics(run)) >= 2, 90, "the job to make progress")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    assert wait_gone(job, timeout=90) == 0  # not requeued
    assert scontrol_field(job, "Restarts") == "0"
    assert (run / "checkpoints" / "latest").is_file()  # the checkpoint was still saved
    err = (run / "submitit" / f"{job}_0_log.err").read_text()
    assert "requeued 0 times (train.max_requeues=0)" in err and "not requeueing" in err
    rc, out, _ = cli(capsys, "jobs", "ls", str(run))
    assert "FAILED" in out


def test_cancel_is_for_good_and_only_for_this_runs_job(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 1-task jobs side by side. A: plain `scancel` (TERM) -> saved, CANCELLED, never
    requeued. B: a second submit on its run dir is refused naming the job; a stale run dir whose
    jobs.json holds B's id (the controller's ids restarted) neither shows B's state nor cancels
    it; `satfuse jobs cancel` then records the cancellation and B ends CANCELLED, saved."""
    monkeypatch.setenv("TOY_STEP_S", "0.3")
    run_a, run_b, stale = tmp_path / "a", tmp_path / "b", tmp_path / "stale"
    one = ("--tasks-per-node", "1")
    job_a = submit_toy(capsys, run_a, "checkpoint.every_steps=1000", steps=400, flags=one)
    job_b = submit_toy(capsys, run_b, "checkpoint.every_steps=1000", steps=400, flags=one)
    wait_for(lambda: len(metrics(run_a)) >= 2 and len(metrics(run_b)) >= 2, 120, "both jobs to make progress")

    # 2. a second submit on B's run dir while B runs
    rc, out, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm", *one,
                       "--entry", TOY, f"train.run_dir={run_b}")
    assert rc == 2 and out == ""
    assert f"pretraining job {job_b}" in err and "RUNNING" in err
    assert f"satfuse jobs cancel {run_b}" in err and "another train.run_dir" in err
    assert len(json.loads((run_b / "jobs.json").read_text())["jobs"]) == 1

    # 3. an old run's jobs.json naming the same id: not this run's job
    (stale / "submitit").mkdir(parents=True)
    entry = {**json.loads((run_b / "jobs.json").read_text())["jobs"][0], "folder": str(stale / "submitit")}
    (stale / "jobs.json").write_text(json.dumps({"jobs": [entry]}))
    rc, out, _ = cli(capsys, "jobs", "ls", str(stale))
    assert rc == 0 and "GONE" in out and "another run's job" in out and "RUNNING" not in out
    assert cli_json(capsys, "jobs", "cancel", str(stale)) == {"cancelled": [], "gone": [job_b]}
    assert job_state(job_b).startswith("RUNNING")

    # 1. plain scancel of A, `satfuse jobs cancel` of B: both stop for good, with a checkpoint
    subprocess.run(["scancel", job_a], check=True, timeout=30)
    assert cli_json(capsys, "jobs", "cancel", str(run_b)) == {"cancelled": [job_b]}
    assert "cancelled" in json.loads((run_b / "jobs.json").read_text())["jobs"][0]
    for job, run in ((job_a, run_a), (job_b, run_b)):
        assert wait_gone(job, timeout=60) == 0  # never requeued
        time.sleep(3)  # a requeue by the task would show up now
        assert job_state(job) == "" and scontrol_field(job, "Restarts") == "0"
        assert scontrol_field(job, "JobState") == "CANCELLED"
        assert (run / "checkpoints" / "latest").is_file()  # saved on TERM although every_steps=1000
        assert final_state(run)["step"] == len(metrics(run)) < 400
        err = (run / "submitit" / f"{job}_0_log.err").read_text()
        assert "stopped by SIGTERM" in err and "not requeueing" in err and "requeued (requeue" not in err
        rc, out, _ = cli(capsys, "jobs", "ls", str(run))
        assert "CANCELLED" in out


def test_recorded_cancel_beats_the_requeue_signal(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`jobs cancel` records the cancellation before it runs scancel: a task that got the
    requeue signal (USR2) meanwhile saves and leaves instead of requeueing itself."""
    from satfuse.launch.jobs import mark_cancelled

    monkeypatch.setenv("TOY_STEP_S", "0.3")
    run = tmp_path / "run"
    job = submit_toy(capsys, run, "checkpoint.every_steps=1000", steps=400, flags=("--tasks-per-node", "1"))
    wait_for(lambda: len(metrics(run)) >= 2, 90, "the job to make progress")
    mark_cancelled(run, [job])
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    assert wait_gone(job, timeout=60) == 0
    time.sleep(3)
    assert job_state(job) == "" and scontrol_field(job, "Restarts") == "0"
    assert (run / "checkpoints" / "latest").is_file()
    err = (run / "submitit" / f"{job}_0_log.err").read_text()
    assert "was cancelled with `satfuse jobs cancel`: checkpoint saved, not requeueing" in err
