"""`--cluster local`: the same PretrainTask through submitit's local executor (no SLURM)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.slurm.slurm_helpers import TINY, cli, cli_json, metrics, wait_for

pytestmark = pytest.mark.usefixtures("job_env")
TOY = "tests.slurm.toy_train:run"


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (via /proc/*/stat parent ids)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def task_pids(controller: int) -> list[int]:
    pids = []
    for p in descendants(controller):
        try:
            if b"submitit.core._submit" in Path(f"/proc/{p}/cmdline").read_bytes():
                pids.append(p)
        except OSError:
            continue
    return pids


def test_local_two_tasks_world_size_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = cli_json(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "local", "--tasks-per-node", "2",
                   "--entry", TOY, f"train.run_dir={run}", "train.steps=5", "--wait")
    assert out["executor"] == "local" and out["results"] == [[0, 0]]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and {r["world"] for r in rows} == {2}
    index = json.loads((run / "jobs.json").read_text())["jobs"]
    assert index[0]["executor"] == "local" and index[0]["tasks"] == 2
    # results and states come from the tasks' JSON outcome records (no result pickle is read)
    job = index[0]["job_id"]
    for task in (0, 1):
        assert json.loads((run / "submitit" / f"{job}_{task}_outcome.json").read_text())["result"] == 0
    assert cli_json(capsys, "jobs", "status", str(run))["jobs"][0]["state"] == "COMPLETED"
    bad = tmp_path / "bad"
    rc, _, err = cli(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "local", "--entry",
                     "tests.slurm.toy_train:nope", f"train.run_dir={bad}", "--wait")
    assert rc == 2 and "failed: SatfuseError: entry 'tests.slurm.toy_train:nope' cannot be imported" in err
    row = cli_json(capsys, "jobs", "status", str(bad))["jobs"][0]
    assert row["state"] == "FAILED" and row["error"].startswith("SatfuseError: entry")


def test_local_stop_signal_restarts_and_resumes(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOY_STEP_S", "0.2")
    run = tmp_path / "run"
    out = cli_json(capsys, "submit", "pretrain", "--config", TINY, "--cluster", "local", "--tasks-per-node", "2",
                   "--entry", TOY, f"train.run_dir={run}", "train.steps=25", "checkpoint.every_steps=1000")
    controller = int(out["jobs"][0]["job_id"])
    wait_for(lambda: len(metrics(run)) >= 3, 90, "the local job to make progress")
    for pid in task_pids(controller):
        os.kill(pid, signal.SIGUSR2)  # what the local controller sends before its time limit
    deadline = time.time() + 120
    while not (run / "submitit" / f"{controller}_0_result.pkl").exists():
        assert time.time() < deadline, "local job did not finish after the restart"
        time.sleep(0.5)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 26))  # no step lost or repeated
    ports = [r["port"] for r in rows]
    assert len(set(ports)) == 2  # restarted once, on a fresh rendezvous port
    assert (run / "submitit" / f".restarts_{controller}").read_text() == "1"
