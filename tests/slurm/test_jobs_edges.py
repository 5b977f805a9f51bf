"""Edges of `satfuse jobs` and `submit` that need no cluster: a damaged jobs.json, a deleted
submitit folder, a merge whose parts did not all complete, a crafted result pickle, task
numbers, a torn metrics line, the checks `submit` makes before it queues, the dry-run
script's guard, and TERM vs the requeue signal in the trainer's stop flag."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
from pathlib import Path

import pytest

from satfuse.engines.signals import REQUEUE_EXIT_CODE, STOP_EXIT_CODE, StopFlag
from tests.slurm.slurm_helpers import TINY, cli


def write_index(run: Path, jobs: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "jobs.json").write_text(json.dumps({"jobs": jobs}))


def entry(run: Path, job_id: str, kind: str = "pretrain", **extra: object) -> dict:
    return {"job_id": job_id, "kind": kind, "executor": "slurm", "tasks": 1,
            "folder": str(run / "submitit"), "submitted": "2026-12-01T10:00:00+0000", **extra}


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """These jobs are long gone: SLURM's tools are not consulted (none on PATH)."""
    monkeypatch.setenv("PATH", "/usr/bin/nonexistent")


def test_jobs_json_entry_missing_a_key_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = entry(tmp_path, "17")
    del bad["folder"]
    write_index(tmp_path, [entry(tmp_path, "16"), bad])
    for action in ("ls", "status", "logs", "cancel"):
        rc, out, err = cli(capsys, "jobs", action, str(tmp_path))
        assert rc == 2 and out == "", action
        assert "jobs.json: job 17 has no 'folder'" in err and "delete that entry" in err
        assert "Traceback" not in err and "KeyError" not in err


def test_logs_of_a_deleted_submitit_folder_say_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_index(tmp_path, [entry(tmp_path, "21")])  # submitit/ does not exist
    rc, _, err = cli(capsys, "jobs", "logs", str(tmp_path))
    assert rc == 2 and "submitit folder was deleted" in err and "job 21" in err
    assert "has not started" not in err
    (tmp_path / "submitit").mkdir()
    rc, _, err = cli(capsys, "jobs", "logs", str(tmp_path))
    assert rc == 2 and "has not started" not in err and "wrote none" in err


def test_merge_after_an_unfinished_part_says_what_to_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    part = {"src": "/data/raw", "dataset": "sen12ms", "out": "/data/shards", "num_shards": 2, "maxcount": 4}
    write_index(tmp_path, [entry(tmp_path, "30_0", "shard", part=0, **part),
                           entry(tmp_path, "30_1", "shard", part=1, **part),
                           entry(tmp_path, "31", "merge", after="30", out="/data/shards")])
    # part 0 completed (the task's outcome record), part 1 and the merge left nothing
    (tmp_path / "submitit").mkdir()
    (tmp_path / "submitit" / "30_0_0_outcome.json").write_text('{"state": "COMPLETED"}')
    rc, out, _ = cli(capsys, "jobs", "ls", str(tmp_path))
    assert rc == 0 and "UNKNOWN" not in out
    lines = out.splitlines()
    assert "COMPLETED" in lines[0]
    merge_hint = next(ln for ln in lines if "merge never ran" in ln)
    assert "part(s) 1 (ended without a result: cancelled or killed) did not complete" in merge_hint
    assert ("satfuse shard --src /data/raw --dataset sen12ms --out /data/shards --num-shards 2 "
            "--shard-index 1 --maxcount 4") in merge_hint
    assert "`satfuse shard merge /data/shards`" in merge_hint


def test_dry_run_script_says_it_is_for_reading_and_stops_if_run(capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    rc, out, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm", "--dry-run",
                       f"train.run_dir={tmp_path / 'run'}")
    assert rc == 0, err
    head = out.splitlines()[:5]
    assert head[0] == "#!/bin/bash" and "for reading and for `sbatch --test-only` only" in head[1]
    lines = out.splitlines()
    guard = lines.index("exit 2")
    assert all(not ln.startswith("#SBATCH") for ln in lines[guard:])  # sbatch still sees every flag
    assert guard < next(i for i, ln in enumerate(lines) if "srun" in ln)
    script = tmp_path / "job.sh"
    script.write_text(out)
    res = subprocess.run(["/bin/bash", str(script)], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and "printed by satfuse submit --dry-run" in res.stderr


@pytest.mark.parametrize(("sig", "code", "terminate"), [(signal.SIGUSR2, REQUEUE_EXIT_CODE, False),
                                                        (signal.SIGTERM, STOP_EXIT_CODE, True)])
def test_term_means_stop_the_requeue_signal_means_requeue(sig: signal.Signals, code: int, terminate: bool) -> None:
    with StopFlag() as flag:
        os.kill(os.getpid(), sig)
        assert flag.should_stop() and flag.terminate is terminate and flag.exit_code == code


class _Crafted:
    """A result pickle as anyone who can write a shared run dir could plant it: loading it
    creates `marker` (any code could run there)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_job_state_never_unpickles_a_run_dirs_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "code-ran"
    write_index(run, [entry(run, "40"), {**entry(run, "2147480000"), "executor": "local"},  # a dead pid
                      entry(run, "41")])
    (run / "submitit").mkdir()
    for job in ("40", "2147480000"):
        (run / "submitit" / f"{job}_0_result.pkl").write_bytes(pickle.dumps(_Crafted(marker)))
    (run / "submitit" / "41_0_outcome.json").write_text('{"state": "FAILED", "error": "SatfuseError: boom"}')
    rc, out, err = cli(capsys, "jobs", "ls", str(run))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[4] == "RESULT" and "pass --trust-checkpoint if you trust this run dir" in lines[1]
    assert lines[2].split()[4] == "RESULT"
    assert lines[4].split()[4] == "FAILED" and "SatfuseError: boom; see `satfuse jobs logs" in lines[5]
    status = json.loads(cli(capsys, "jobs", "status", str(run))[1])
    assert [j["state"] for j in status["jobs"]] == ["RESULT", "RESULT", "FAILED"]
    assert status["jobs"][2]["error"] == "SatfuseError: boom"
    # submit's running-job check reads the same states (it then stops: no sbatch on PATH here)
    rc, _, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm",
                     f"train.run_dir={run}")
    assert rc == 2 and "sbatch not found" in err
    assert not marker.exists()
    # only the user's --trust-checkpoint unpickles (and then the crafted file runs)
    rc, out, _ = cli(capsys, "jobs", "ls", "--trust-checkpoint", str(run))
    assert rc == 0 and marker.exists()


def test_logs_of_a_task_the_job_does_not_have(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_index(tmp_path, [{**entry(tmp_path, "52"), "tasks": 2}])
    (tmp_path / "submitit").mkdir()
    rc, _, err = cli(capsys, "jobs", "logs", str(tmp_path), "--task", "7")
    assert rc == 2 and "job 52 has no task 7: it has 2 task(s); pass --task 0..1" in err
    assert "has not started" not in err


def test_status_shows_the_last_good_metrics_line_and_parses_scontrol_values_with_spaces(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from satfuse.launch.jobs import parse_scontrol

    write_index(tmp_path, [entry(tmp_path, "60")])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    status = json.loads(cli(capsys, "jobs", "status", str(tmp_path))[1])
    assert status["last_metrics"] == {"step": 2, "loss": 1.5}
    assert "last 1 line(s) unreadable" in status["metrics_note"]
    line = ("JobId=60 JobName=satfuse-pretrain-my run JobState=PENDING Reason=JobHeldUser Dependency=(null) "
            "Requeue=1 Restarts=0 Command=/tmp/my run/submitit/60_submission.sh WorkDir=/tmp/my run "
            "StdErr=/tmp/my run/submitit/60_0_log.err")
    fields = parse_scontrol(line)
    assert fields["Command"] == "/tmp/my run/submitit/60_submission.sh"
    assert fields["JobState"] == "PENDING" and fields["Reason"] == "JobHeldUser" and fields["Restarts"] == "0"


def test_submit_checks_the_run_dir_and_the_output_before_queueing(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    """Each refusal comes before anything is queued (no SLURM tools on PATH here: reaching
    sbatch would fail with "sbatch not found" instead)."""
    from satfuse.engines.rundir import RunLease
    from satfuse.launch import jobs

    run = tmp_path / "run"
    # 1. another submit is between its checks and its recorded job
    with jobs.submitting(run):
        rc, out, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm",
                           f"train.run_dir={run}")
    assert rc == 2 and out == "" and "another `satfuse submit` is queueing a job into this run dir" in err
    assert not (run / "jobs.json").exists()
    # 2. a local `satfuse pretrain` holds the run dir's lease
    lease = RunLease(run)
    lease.acquire()
    try:
        rc, out, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm",
                           f"train.run_dir={run}")
    finally:
        lease.release()
    assert rc == 2 and "another run is writing this run dir (pid " in err and "nothing queued" in err
    rc, _, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "localslurm",
                     f"train.run_dir={run}")
    assert rc == 2 and "sbatch not found" in err  # the lease released: the checks pass
    # 3. `submit shard` onto a directory the parts would refuse
    src, out_dir = tmp_path / "raw", tmp_path / "shards"
    src.mkdir()
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    argv = ["submit", "shard", "--src", str(src), "--out", str(out_dir), "--cluster", "localslurm",
            "--array-size", "2", "--run-dir", str(tmp_path / "shard-run")]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and "not empty and not a satfuse shard directory" in err and "--overwrite" in err
    assert "nothing queued" in err
    rc, _, err = cli(capsys, *argv, "--overwrite")
    assert rc == 2 and "sbatch not found" in err
    assert (out_dir / "notes.txt").is_file()  # emptied only once every check passed


def test_term_after_the_requeue_signal_still_stops_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    """`scancel --signal=USR2 J; scancel J`: the TERM wins before the agreement (it replaces the
    USR2), during the save (the exit code turns 143), and after the trainer returned (the
    process remembers it for the launcher: `term_seen`)."""
    from satfuse.engines.signals import term_seen

    monkeypatch.setattr(StopFlag, "term_seen", False)
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.should_stop() and flag.terminate and flag.exit_code == STOP_EXIT_CODE
    assert term_seen()
    monkeypatch.setattr(StopFlag, "term_seen", False)
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.should_stop() and not flag.terminate and flag.exit_code == REQUEUE_EXIT_CODE
        assert not term_seen()
        os.kill(os.getpid(), signal.SIGTERM)  # while the requeue checkpoint is being written
        assert flag.exit_code == STOP_EXIT_CODE and term_seen()


def test_a_run_stopped_early_never_reads_as_finished(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A job that saved and stopped before train.steps (the task's `stopped` record): `jobs ls`
    and `status` say so with the step; a cancelled one says CANCELLED; neither blocks a resubmit
    (SLURM's STOPPED would: that is a suspended job)."""
    from satfuse.launch.jobs import active_jobs, record_stop

    stop = {"step": 74, "steps": 3000, "why": "SIGTERM (scancel, a kill from outside)", "exit_code": 143}
    write_index(tmp_path, [entry(tmp_path, "40"), entry(tmp_path, "41"), entry(tmp_path, "42", cancelled="x")])
    record_stop(tmp_path, "40", stop)
    record_stop(tmp_path, "42", {**stop, "step": 7})
    rc, out, _ = cli(capsys, "jobs", "ls", str(tmp_path))
    rows = out.splitlines()
    assert rc == 0 and "STOPPED_EARLY at step 74/3000" in rows[0] and "COMPLETED" not in out
    assert rows[1].startswith("  -> stopped by SIGTERM") and "submit the same command again" in rows[1]
    assert "ENDED" in rows[2] and "CANCELLED at step 7/3000" in rows[3]
    status = json.loads(cli(capsys, "jobs", "status", str(tmp_path))[1])
    assert status["jobs"][0]["stopped"]["step"] == 74 and status["jobs"][0]["state"].startswith("STOPPED_EARLY")
    assert active_jobs(tmp_path, "pretrain") == []
    record_stop(tmp_path, "40", None)  # a requeued attempt of the job started
    assert "stopped" not in json.loads((tmp_path / "jobs.json").read_text())["jobs"][0]
