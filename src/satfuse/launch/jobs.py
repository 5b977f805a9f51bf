"""The jobs of a run: a small `RUN_DIR/jobs.json` index beside submitit's folder.

Why an index: submitit's folder holds pickles and logs named by job id, but not which ids
belong to this run, which one is the merge of which array, or what command submitted them.
`satfuse jobs ls|status|logs|cancel RUN` read it; state comes from `squeue` while a job is
known to SLURM and from submitit's result pickles afterwards (the test cluster has no
accounting, so `sacct`/`job.state` would say UNKNOWN).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from satfuse.utils import SatfuseError, atomic_write_text

log = logging.getLogger(__name__)

INDEX = "jobs.json"
SUBMITIT_DIR = "submitit"


def submitit_folder(run_dir: Path) -> Path:
    return Path(run_dir) / SUBMITIT_DIR


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the index between concurrent `satfuse submit`s."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".jobs.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_index(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / INDEX
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SatfuseError(f"{path}: not valid JSON ({exc.msg}); restore it or delete it to forget old jobs") from exc
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise SatfuseError(f"{path}: expected {{\"jobs\": [...]}}; restore it or delete it")
    return data["jobs"]


def record_jobs(run_dir: Path, entries: list[dict[str, Any]]) -> None:
    """Append submitted jobs to the index (atomic rewrite under a lock)."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        jobs = read_index(run_dir) + entries
        atomic_write_text(run_dir / INDEX, json.dumps({"jobs": jobs}, indent=2) + "\n")


def job_entry(job: Any, kind: str, executor: str, tasks: int, **extra: Any) -> dict[str, Any]:
    """Index record of a submitit job."""
    return {
        "job_id": str(job.job_id),
        "kind": kind,
        "executor": executor,
        "tasks": tasks,
        "folder": str(Path(job.paths.folder).resolve()),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def resolve_run(run: str) -> Path:
    """RUN is a run directory, or a name under ./runs."""
    for cand in (Path(run), Path("runs") / run):
        if (cand / INDEX).is_file():
            return cand
    raise SatfuseError(f"{run}: no {INDEX} here or under runs/; pass the run directory given to `satfuse submit`")


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def _paths(entry: dict[str, Any], task: int = 0) -> Any:
    from submitit.core.utils import JobPaths

    return JobPaths(entry["folder"], job_id=entry["job_id"], task_id=task)


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: 'STATE reason'} for jobs SLURM still knows (pending, running, requeued)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    # all jobs, filtered here: `squeue -j` fails as a whole once one id has been purged
    res = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T %r"], capture_output=True, text=True,
                         timeout=60, check=False)
    wanted = set(job_ids)
    out: dict[str, str] = {}
    for line in res.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] in wanted:
            out[parts[0]] = " ".join(parts[1:])
    return out


def result_state(entry: dict[str, Any]) -> str:
    """COMPLETED/FAILED from submitit's result pickle of task 0, else UNKNOWN."""
    path = _paths(entry).result_pickle
    if not path.is_file():
        return "UNKNOWN"
    try:
        with open(path, "rb") as fh:
            outcome = pickle.load(fh)[0]
    except Exception:  # a pickle from another environment: still says the job ended
        return "ENDED"
    return "COMPLETED" if outcome == "success" else "FAILED"


def local_alive(entry: dict[str, Any]) -> bool:
    try:
        os.kill(int(entry["job_id"]), 0)
    except (OSError, ValueError):
        return False
    return True


def job_state(entry: dict[str, Any], queue: dict[str, str]) -> str:
    if entry["executor"] == "local":
        return "RUNNING" if local_alive(entry) and result_state(entry) == "UNKNOWN" else result_state(entry)
    jid = entry["job_id"]
    if jid in queue:
        return queue[jid]
    return result_state(entry)


def list_jobs(run_dir: Path) -> list[dict[str, Any]]:
    jobs = read_index(run_dir)
    queue = squeue_states([j["job_id"] for j in jobs if j["executor"] == "slurm"])
    return [{**j, "state": job_state(j, queue)} for j in jobs]


def run_progress(run_dir: Path) -> dict[str, Any]:
    """What the trainer left in the run dir: latest checkpoint and last metrics line."""
    info: dict[str, Any] = {}
    latest = Path(run_dir) / "checkpoints" / "latest"
    if latest.is_file():
        info["latest_checkpoint"] = latest.read_text().strip()
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text().strip().splitlines()
        if lines:
            with contextlib.suppress(json.JSONDecodeError):
                info["last_metrics"] = json.loads(lines[-1])
    return info


def scontrol_show(job_id: str) -> dict[str, str]:
    if shutil.which("scontrol") is None:
        return {}
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id.split("_")[0]],
                         capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        return {}
    fields: dict[str, str] = {}
    for tok in res.stdout.split():
        key, eq, value = tok.partition("=")
        if eq and key in ("JobState", "Reason", "Restarts", "RunTime", "TimeLimit", "NodeList",
                          "Partition", "ExitCode", "NumTasks", "Requeue"):
            fields[key] = value
    return fields


def status(run_dir: Path) -> dict[str, Any]:
    jobs = list_jobs(run_dir)
    for j in jobs:
        if j["executor"] == "slurm":
            j["slurm"] = scontrol_show(j["job_id"])
    return {"run_dir": str(run_dir), "jobs": jobs, **run_progress(run_dir)}


# --------------------------------------------------------------------------------------------
# Logs and cancel
# --------------------------------------------------------------------------------------------


def select(run_dir: Path, job_id: str | None) -> dict[str, Any]:
    jobs = read_index(run_dir)
    if not jobs:
        raise SatfuseError(f"{run_dir / INDEX}: no jobs recorded")
    if job_id is None:
        return jobs[-1]
    for j in jobs:
        if j["job_id"] == job_id:
            return j
    raise SatfuseError(f"job {job_id} is not in {run_dir / INDEX}; known: {[j['job_id'] for j in jobs]}")


def log_text(entry: dict[str, Any], task: int = 0, stream: str = "stderr", tail: int = 0) -> str:
    """stdout/stderr of one task (appended across requeues)."""
    paths = _paths(entry, task)
    path = paths.stderr if stream == "stderr" else paths.stdout
    if not path.is_file():
        raise SatfuseError(f"{path}: no log yet (job {entry['job_id']} task {task} has not started)")
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-tail:] if tail > 0 else lines)


def cancel(run_dir: Path, job_id: str | None = None) -> list[str]:
    """Cancel the run's jobs that are still queued or running (or only `job_id`)."""
    jobs = read_index(run_dir) if job_id is None else [select(run_dir, job_id)]
    slurm_ids = [j["job_id"] for j in jobs if j["executor"] == "slurm"]
    queue = squeue_states(slurm_ids)
    cancelled = [j for j in slurm_ids if j in queue or j.split("_")[0] in queue]
    if cancelled:
        res = subprocess.run(["scancel", *sorted(set(cancelled))], capture_output=True, text=True,
                             timeout=60, check=False)
        if res.returncode != 0:
            raise SatfuseError(f"scancel {' '.join(cancelled)} failed: {res.stderr.strip()}")
    for j in jobs:
        if j["executor"] == "local" and local_alive(j) and result_state(j) == "UNKNOWN":
            os.kill(int(j["job_id"]), signal.SIGINT)  # submitit's local controller stops its tasks
            cancelled.append(j["job_id"])
    return cancelled
