"""How a pretraining job stops, on the real local SLURM cluster (toy trainer, `satfuse submit`):
a cancel that follows a preemption notice stays a cancel, a stop from outside SLURM does not
read as a finished run, and `requeue: false` is honoured. Two small jobs side by side per test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.slurm_helpers import (
    ROOT,
    cli,
    cli_json,
    job_state,
    metrics,
    scontrol_field,
    wait_for,
    wait_gone,
)
from tests.slurm.test_submit_slurm import final_state, submit_toy

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_env", "job_env")]
ONE = ("--tasks-per-node", "1")


def ended_for_good(capsys: pytest.CaptureFixture[str], job: str, run: Path) -> tuple[str, dict]:
    """The job left the queue without a requeue, saved: its `jobs ls` line and its index entry."""
    assert wait_gone(job, timeout=90) == 0
    time.sleep(3)  # a requeue by the task would show up now
    assert job_state(job) == "" and scontrol_field(job, "Restarts") == "0"
    assert final_state(run)["step"] == len(metrics(run)) < 400  # saved at the step it stopped
    rc, out, _ = cli(capsys, "jobs", "ls", str(run))
    assert rc == 0 and "COMPLETED" not in out
    return out, json.loads((run / "jobs.json").read_text())["jobs"][0]


def test_a_term_after_the_requeue_signal_wins(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A: `scancel --signal=USR2 A; scancel A` back to back (the reported bug: saved, 75, requeued
    itself, trained again). B: the USR2 checkpoint is saved and the trainer has decided 75; a TERM
    from outside SLURM lands before the task requeues (SLURM still says RUNNING): it wins too."""
    monkeypatch.setenv("TOY_STEP_S", "0.3")
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    job_a = submit_toy(capsys, run_a, "checkpoint.every_steps=1000", steps=400, flags=ONE)
    monkeypatch.setenv("TOY_LINGER_S", "3")
    job_b = submit_toy(capsys, run_b, "checkpoint.every_steps=1000", steps=400, flags=ONE)
    wait_for(lambda: len(metrics(run_a)) >= 2 and len(metrics(run_b)) >= 2, 120, "both jobs to make progress")

    subprocess.run(["scancel", "--signal=USR2", job_a], check=True, timeout=30)
    subprocess.run(["scancel", job_a], check=True, timeout=30)
    subprocess.run(["scancel", "--signal=USR2", job_b], check=True, timeout=30)
    wait_for(lambda: (run_b / "checkpoints" / "latest").is_file(), 30, "B's requeue checkpoint")
    os.kill(int((run_b / "pid.0").read_text()), signal.SIGTERM)

    out, _ = ended_for_good(capsys, job_a, run_a)
    assert scontrol_field(job_a, "JobState") == "CANCELLED" and "CANCELLED at step" in out
    out, rec = ended_for_good(capsys, job_b, run_b)
    assert scontrol_field(job_b, "ExitCode") == "143:0"
    assert f"STOPPED_EARLY at step {final_state(run_b)['step']}/400" in out
    assert rec["stopped"]["exit_code"] == 143
    for job, run in ((job_a, run_a), (job_b, run_b)):
        err = (run / "submitit" / f"{job}_0_log.err").read_text()
        assert "stopped by SIGTERM" in err and "not requeueing" in err and "requeued (requeue" not in err
    assert "SIGTERM arrived after the checkpoint for the requeue signal" in (
        run_b / "submitit" / f"{job_b}_0_log.err").read_text()


def test_stop_from_outside_and_requeue_false_are_not_success(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """C (2 tasks): SIGTERM to rank 1's process, not through SLURM: every rank saves and stops;
    the job's exit code is 143 (not COMPLETED 0) and `jobs ls`/`status` say stopped, at which
    step. D (`requeue: false`): submitted with --no-requeue; USR2 saves and stops with 75."""
    monkeypatch.setenv("TOY_STEP_S", "0.3")
    profile = tmp_path / "norequeue.yaml"
    profile.write_text((ROOT / "hpc" / "clusters" / "localslurm.yaml").read_text().replace(
        "requeue: true", "requeue: false"))
    run_c, run_d = tmp_path / "c", tmp_path / "d"
    job_c = submit_toy(capsys, run_c, "checkpoint.every_steps=1000", steps=400)
    job_d = cli_json(capsys, "submit", "pretrain", "--config", str(ROOT / "hpc" / "pretrain" / "tiny.yaml"),
                     "--cluster", str(profile), *ONE, "--entry", "tests.slurm.toy_train:run",
                     f"train.run_dir={run_d}", "train.steps=400", "checkpoint.every_steps=1000")["jobs"][0]["job_id"]
    assert scontrol_field(job_d, "Requeue") == "0" and scontrol_field(job_c, "Requeue") == "1"
    wait_for(lambda: len(metrics(run_c)) >= 2, 120, "C to make progress")
    os.kill(int((run_c / "pid.1").read_text()), signal.SIGTERM)
    wait_for(lambda: len(metrics(run_d)) >= 2, 120, "D to make progress")  # 3 tasks > 2 CPUs: D runs after C
    subprocess.run(["scancel", "--signal=USR2", job_d], check=True, timeout=30)

    out, rec = ended_for_good(capsys, job_c, run_c)
    step = final_state(run_c)["step"]
    assert scontrol_field(job_c, "JobState") == "FAILED" and scontrol_field(job_c, "ExitCode") == "143:0"
    assert f"STOPPED_EARLY at step {step}/400" in out and "-> stopped by SIGTERM" in out
    assert rec["stopped"]["step"] == step
    status = cli_json(capsys, "jobs", "status", str(run_c))["jobs"][0]
    assert status["state"].startswith("STOPPED_EARLY") and status["slurm"]["ExitCode"] == "143:0"

    out, rec = ended_for_good(capsys, job_d, run_d)
    assert scontrol_field(job_d, "ExitCode") == "75:0" and "STOPPED_EARLY at step" in out
    assert "requeue: false" in rec["stopped"]["why"]
    err = (run_d / "submitit" / f"{job_d}_0_log.err").read_text()
    assert "with requeue: false in the cluster profile" in err and "requeued (requeue" not in err
