"""The real trainer (`satfuse.engines.pretrain.run_pretrain`, tiny model, synthetic SEN12MS
shards) submitted with `satfuse submit` and with the plain `slurm/pretrain.sbatch` template,
on the real local SLURM cluster: world size 2, checkpoints, preemption -> requeue -> resume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.slurm.slurm_helpers import (
    ROOT,
    TINY,
    cli_json,
    metrics,
    scontrol_field,
    wait_for,
    wait_gone,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_env", "job_env")]


def submit_tiny(capsys: pytest.CaptureFixture[str], shards: Path, run_dir: Path, *extra: str) -> dict:
    return cli_json(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm",
                    f"data.shards={shards}", f"train.run_dir={run_dir}", "train.device=cpu", *extra)


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in metrics(run_dir) if "loss" in r]


def test_tiny_pretraining_2_tasks_writes_checkpoints(capsys: pytest.CaptureFixture[str], sen12ms_shards: Path,
                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = submit_tiny(capsys, sen12ms_shards, run, "train.steps=6", "checkpoint.every_steps=3",
                      "train.log_every=1", "--wait")
    assert out["results"] == [[0, 0]]  # one job, both ranks returned 0 (steps done)
    assert {p.name for p in (run / "checkpoints").glob("step_*")} >= {"step_00000003", "step_00000006"}
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("step_00000006")
    assert steps_logged(run) == list(range(1, 7))
    log = (run / "submitit" / f"{out['jobs'][0]['job_id']}_0_log.err").read_text()
    assert "joining process group: rank 0/2" in log


def test_preempted_pretraining_resumes_to_the_same_end(capsys: pytest.CaptureFixture[str], sen12ms_shards: Path,
                                                       tmp_path: Path) -> None:
    """Preempted mid-run by `scontrol requeue` (SLURM sends TERM, KILL after KillWait): every
    rank saves, the job is requeued, resumes from the checkpoint and ends at the configured step
    like the uninterrupted job above (the toy tests compare final states, and cover the
    pre-timeout USR2 path)."""
    run = tmp_path / "run"
    job = submit_tiny(capsys, sen12ms_shards, run, "train.steps=30", "train.log_every=1",
                      "checkpoint.every_steps=1000")["jobs"][0]["job_id"]
    wait_for(lambda: len(steps_logged(run)) >= 3, 180, "the job to train a few steps")
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    assert wait_gone(job, timeout=300) >= 1
    assert scontrol_field(job, "Restarts") == "1" and scontrol_field(job, "JobState") == "COMPLETED"
    steps = steps_logged(run)
    assert steps[-1] == 30 and sorted(set(steps)) == list(range(1, 31))
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert len(saved) == 2 and saved[-1] == "step_00000030"  # the preemption save + the final one
    stop_step = int(saved[0].split("_")[1])
    assert 3 <= stop_step < 30
    log = (run / "submitit" / f"{job}_0_log.err").read_text()
    resumed = [ln for ln in log.splitlines() if "resumed from" in ln]
    assert len(resumed) == 1 and f"at step {stop_step}" in resumed[0]
    # SLURM's requeue sends TERM: the task saves and leaves without requeueing, SLURM requeues;
    # the log says so (not "stopped ... not requeueing"), and no stop is recorded for `jobs ls`
    assert "is being requeued by SLURM itself" in log and "SatfuseError" not in log
    assert "not requeueing" not in log and "stopped by SIGTERM" not in log
    assert "stopped" not in json.loads((run / "jobs.json").read_text())["jobs"][0]


def test_plain_sbatch_template_requeues_and_resumes(sen12ms_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "CONFIG": TINY, "SATFUSE": str(ROOT / ".venv" / "bin" / "satfuse")}
    res = subprocess.run(
        ["sbatch", "--parsable", "--time=30", f"--output={tmp_path}/job-%j.out", str(ROOT / "slurm" / "pretrain.sbatch"),
         f"data.shards={sen12ms_shards}", f"train.run_dir={run}", "train.device=cpu", "train.steps=40",
         "train.log_every=1", "checkpoint.every_steps=1000"],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    wait_for(lambda: len(steps_logged(run)) >= 3, 180, "the template job to train a few steps")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    assert wait_gone(job, timeout=300) >= 1
    assert scontrol_field(job, "Restarts") == "1" and scontrol_field(job, "JobState") == "COMPLETED"
    steps = steps_logged(run)
    assert steps[-1] == 40 and sorted(set(steps)) == list(range(1, 41))
    log = (tmp_path / f"job-{job}.out").read_text()
    assert "attempt 1" in log and "attempt 2" in log and "requeueing job" in log  # appended


@pytest.mark.deepspeed
def test_deepspeed_engine_through_submit(capsys: pytest.CaptureFixture[str], sen12ms_shards: Path,
                                         tmp_path: Path) -> None:
    """The same task launches DeepSpeed (ZeRO-1 on CPU): the engine is the config's business."""
    run = tmp_path / "run"
    out = cli_json(capsys, "submit", "pretrain", "--config", str(ROOT / "hpc" / "pretrain" / "tiny_deepspeed.yaml"),
                   "--cluster", "localslurm", f"data.shards={sen12ms_shards}", f"train.run_dir={run}",
                   "train.device=cpu", "train.steps=4", "checkpoint.every_steps=2", "--wait")
    assert out["results"] == [[0, 0]]
    assert {p.name for p in (run / "checkpoints").glob("step_*")} >= {"step_00000002", "step_00000004"}
    log = (run / "submitit" / f"{out['jobs'][0]['job_id']}_0_log.err").read_text()
    assert "DeepSpeed engine" in log and "2 rank(s)" in log
