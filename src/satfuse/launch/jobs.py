"""The jobs of a run: a small `RUN_DIR/jobs.json` index beside submitit's folder.

Why an index: submitit's folder holds pickles and logs named by job id, but not which ids
belong to this run, which one is the merge of which array, or what command submitted them.
`satfuse jobs ls|status|logs|cancel RUN` read it; state comes from `squeue` and `scontrol`
while SLURM knows a job, and from satfuse's own JSON outcome records afterwards (the test
cluster has no accounting, so `sacct`/`job.state` would say UNKNOWN).

Everything in a run directory is data, never code: submitit's `*_result.pkl` are pickles
(loading one runs whatever its author put in it, and run dirs are shared), so they are never
unpickled here unless the user passes `--trust-checkpoint`. Each task records how it ended in
`submitit/<job>_<task>_outcome.json` instead (`satfuse.launch.outcomes`).

A run's job records belong to the directory they are in: `folder` (absolute) must be this
run dir's `submitit/`. After `cp -r runA runB`, runB's jobs.json still names runA's jobs;
they are shown as ELSEWHERE and never cancelled, counted as running, or trusted from runB.

Job ids are not names: a reinstalled or reset slurmctld starts again at 1, and an old run's
id may then belong to someone else's job. Before a job id is trusted (its state shown, or
it is cancelled), SLURM's record of the job must point into this run: the batch script
submitit queued lies in the run's submitit folder (`Command=`). A job that fails the check
is reported as gone, never acted on.

`satfuse jobs cancel` also writes `cancelled` into the job's entry: the task reads it
before it would requeue itself (and when a requeued attempt starts), so a cancelled run
stays cancelled whatever signal reached it. The task writes `stopped` (step, train.steps,
why) when it saved and stopped before the end without requeueing: the job then reads
`STOPPED_EARLY at step N/M` (CANCELLED/TIMEOUT with the step when it was cancelled or timed
out), never COMPLETED. Not SLURM's STOPPED: that is a suspended job, still holding its nodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from satfuse.checkpoint.layout import LATEST
from satfuse.launch.outcomes import read_outcome
from satfuse.run_layout import JOBS_INDEX, RunLayout
from satfuse.utils import SatfuseError, atomic_write_text

log = logging.getLogger(__name__)

def submitit_folder(run_dir: Path) -> Path:
    """The run's submitit folder (every job of the run is queued with it)."""
    return RunLayout(run_dir).submitit


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the index between concurrent `satfuse submit`s."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(RunLayout(run_dir).jobs_lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def submitting(run_dir: Path) -> Iterator[None]:
    """Hold the run dir's submit lock from the checks to the recorded job.

    Why: two `satfuse submit`s started together on one run dir would both pass the
    running-job check and both queue (the trainer's lease then fails one at start). The
    second one is refused at once instead, before it queues anything.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(RunLayout(run_dir).submit_lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SatfuseError(
                f"{run_dir}: another `satfuse submit` is queueing a job into this run dir right now; "
                f"nothing queued: see `satfuse jobs ls {run_dir}` once it is done, or pass another train.run_dir"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


REQUIRED_KEYS = ("job_id", "kind", "executor", "folder")


def read_index(run_dir: Path) -> list[dict[str, Any]]:
    path = RunLayout(run_dir).jobs_index
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SatfuseError(f"{path}: not valid JSON ({exc.msg}); restore it or delete it to forget old jobs") from exc
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise SatfuseError(f"{path}: expected {{\"jobs\": [...]}}; restore it or delete it")
    for i, entry in enumerate(data["jobs"]):
        if not isinstance(entry, dict):
            raise SatfuseError(f"{path}: job entry {i} is not a mapping; restore the file or delete that entry")
        missing = [k for k in REQUIRED_KEYS if k not in entry]
        if missing:
            ident = f"job {entry['job_id']}" if "job_id" in entry else f"job entry {i}"
            raise SatfuseError(
                f"{path}: {ident} has no {missing[0]!r} (needs {list(REQUIRED_KEYS)}); restore the file "
                "from `satfuse submit`'s output or delete that entry"
            )
        entry["job_id"] = str(entry["job_id"])
    return data["jobs"]


def mark_cancelled(run_dir: Path, job_ids: list[str]) -> None:
    """Record in the index that these jobs were cancelled (read by the task before a requeue)."""
    run_dir = Path(run_dir)
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with _locked(run_dir):
        entries = read_index(run_dir)
        for e in entries:
            if origin(run_dir, e) is None and (e["job_id"] in job_ids or e["job_id"].split("_")[0] in job_ids):
                e.setdefault("cancelled", when)
        atomic_write_text(RunLayout(run_dir).jobs_index, json.dumps({"jobs": entries}, indent=2) + "\n")


def is_cancelled(run_dir: Path, job_id: str) -> bool:
    """Whether `satfuse jobs cancel` recorded this job (an unreadable index counts as not)."""
    try:
        entries = read_index(Path(run_dir))
    except SatfuseError:
        return False
    return any("cancelled" in e and e["job_id"] == str(job_id) for e in entries)


def record_stop(run_dir: Path, job_id: str, stop: dict[str, Any] | None) -> None:
    """Record that the job saved and stopped before the end (`stop`: step, steps, why), or
    forget it (None: a requeued attempt of the job is running). An unreadable index is left
    alone: the job's log and exit code still say it."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        try:
            entries = read_index(run_dir)
        except SatfuseError as exc:
            log.warning("job %s stopped, not recorded in the index: %s", job_id, exc)
            return
        mine = [e for e in entries if e["job_id"] == str(job_id) and (stop is not None or "stopped" in e)]
        for e in mine:
            if stop is None:
                del e["stopped"]
            else:
                e["stopped"] = stop
        if mine:
            atomic_write_text(RunLayout(run_dir).jobs_index, json.dumps({"jobs": entries}, indent=2) + "\n")


def stopped_state(entry: dict[str, Any], slurm_state: str = "") -> str:
    """`STOPPED_EARLY at step N/M` for a job that saved and stopped before the end; CANCELLED
    or TIMEOUT instead when the index or SLURM (while it still knows the job) says so."""
    stop = entry["stopped"]
    word = ("CANCELLED" if "cancelled" in entry else slurm_state if slurm_state in ("CANCELLED", "TIMEOUT")
            else "STOPPED_EARLY")
    step = "?" if stop.get("step") is None else stop["step"]
    return f"{word} at step {step}/{stop.get('steps', '?')}"


def record_jobs(run_dir: Path, entries: list[dict[str, Any]]) -> None:
    """Append submitted jobs to the index (atomic rewrite under a lock)."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        jobs = read_index(run_dir) + entries
        atomic_write_text(RunLayout(run_dir).jobs_index, json.dumps({"jobs": jobs}, indent=2) + "\n")


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
        if RunLayout(cand).jobs_index.is_file():
            return cand
    raise SatfuseError(f"{run}: no {JOBS_INDEX} here or under runs/; pass the run directory given to `satfuse submit`")


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def _paths(entry: dict[str, Any], task: int = 0, folder: Path | None = None) -> Any:
    from submitit.core.utils import JobPaths  # lazy: --help stays fast (submitit)

    return JobPaths(folder or entry["folder"], job_id=entry["job_id"], task_id=task)


def origin(run_dir: Path, entry: dict[str, Any]) -> Path | None:
    """The run dir that recorded this job when it is not `run_dir` (a copy or a move), else None."""
    if os.path.realpath(entry["folder"]) == os.path.realpath(submitit_folder(run_dir)):
        return None
    return Path(entry["folder"]).parent


def squeue_rows(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: ('STATE reason', batch script path)} for jobs SLURM still lists."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    # all jobs, filtered here: `squeue -j` fails as a whole once one id has been purged
    res = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r|%o"], capture_output=True, text=True,
                         timeout=60, check=False)
    wanted = set(job_ids)
    out: dict[str, tuple[str, str]] = {}
    for line in res.stdout.splitlines():
        parts = line.split("|", 3)
        if len(parts) == 4 and parts[0] in wanted:
            out[parts[0]] = (f"{parts[1]} {parts[2]}".strip(), parts[3].strip())
    return out


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: 'STATE reason'} for jobs SLURM still knows (pending, running, requeued)."""
    return {k: v[0] for k, v in squeue_rows(job_ids).items()}


def owns(entry: dict[str, Any], command: str) -> bool:
    """Whether SLURM's job (its batch script path) is this entry's: the script lies in its folder."""
    if not command:
        return False
    return os.path.realpath(os.path.dirname(command)) == os.path.realpath(entry["folder"])


def own_queue(entries: list[dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """Queue states of the entries' SLURM jobs, and the ids now used by other runs' jobs."""
    slurm = [e for e in entries if e["executor"] == "slurm"]
    rows = squeue_rows([e["job_id"] for e in slurm])
    by_id = {e["job_id"]: e for e in slurm}
    mine = {j: st for j, (st, cmd) in rows.items() if owns(by_id[j], cmd)}
    foreign = sorted(j for j in rows if j not in mine)
    return mine, foreign


def result_state(entry: dict[str, Any], folder: Path | None = None, trust: bool = False) -> str:
    """COMPLETED/FAILED from task 0's outcome record, else UNKNOWN (no result yet).

    submitit's result pickle of a job without a record (an older satfuse) says only that the
    job ended (RESULT): it is unpickled, for COMPLETED/FAILED, only with `trust` (the user's
    `--trust-checkpoint`), since loading a pickle runs code its author chose.
    """
    folder = Path(folder or entry["folder"])
    rec = read_outcome(folder, entry["job_id"])
    if rec is not None:
        return rec["state"]
    path = _paths(entry, folder=folder).result_pickle
    if not path.is_file():
        return "UNKNOWN"
    if not trust:
        return "RESULT"
    log.warning("%s: unpickling (--trust-checkpoint)", path)
    try:
        with open(path, "rb") as fh:
            outcome = pickle.load(fh)[0]  # noqa: S301 - the user trusts this run dir
    except Exception:  # a pickle from another environment: still says the job ended
        return "RESULT"
    return "COMPLETED" if outcome == "success" else "FAILED"


def local_alive(entry: dict[str, Any]) -> bool:
    try:
        os.kill(int(entry["job_id"]), 0)
    except (OSError, ValueError):
        return False
    return True


ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING")


def job_state(entry: dict[str, Any], queue: dict[str, str], foreign: frozenset[str] = frozenset(),
              trust: bool = False) -> str:
    if entry["executor"] == "local":
        state = result_state(entry, trust=trust)
        state = "RUNNING" if local_alive(entry) and state == "UNKNOWN" else state
        return stopped_state(entry) if state == "UNKNOWN" and "stopped" in entry else state
    jid = entry["job_id"]
    if jid in queue:
        return queue[jid]
    state = result_state(entry, trust=trust)
    if state != "UNKNOWN":
        return state
    if "stopped" in entry and jid not in foreign:
        recent = scontrol_show(jid)
        return stopped_state(entry, recent.get("JobState", "") if owns(entry, recent.get("Command", "")) else "")
    if "cancelled" in entry:
        return "CANCELLED"
    if jid in foreign:
        return "GONE"
    recent = scontrol_show(jid)  # SLURM keeps ended jobs for MinJobAge (default 300 s)
    if recent.get("JobState") and owns(entry, recent.get("Command", "")):
        return recent["JobState"]
    return "ENDED"  # no result: cancelled, killed or lost; SLURM no longer knows it


def _hint(entry: dict[str, Any], state: str, by_id: dict[str, dict[str, Any]]) -> str:
    """What to do about a job that did not end with a result."""
    first = state.split()[0] if state else ""
    if first == "ELSEWHERE":
        return (f"recorded by the run dir {entry['_origin']}: this one is a copy of it (or was moved); that job "
                f"is shown and acted on only from there: `satfuse jobs ls {entry['_origin']}`")
    if first == "RESULT":
        return ("ended with a result that is not read: submitit's result pickle runs code when loaded; pass "
                "--trust-checkpoint if you trust this run dir, or see `satfuse jobs logs`")
    if first == "GONE":
        return (f"job id {entry['job_id']} now belongs to another run's job (the controller's ids restarted); "
                "this run's job is gone: see `satfuse jobs logs`, resubmit to continue")
    if entry["kind"] == "merge" and first in ("ENDED", "CANCELLED", "PENDING") and (
            first != "PENDING" or "DependencyNeverSatisfied" in state):
        bad = [e for e in by_id.values() if e["kind"] == "shard"
               and e["job_id"].split("_")[0] == str(entry.get("after", "")) and e.get("_state") != "COMPLETED"]
        parts = ", ".join(f"{e.get('part', '?')} ({_said(e.get('_state', '?'))})" for e in bad) or "?"
        cmds = [part_command(e) for e in bad]
        out = entry.get("out", "OUT")
        return (f"the merge never ran: shard part(s) {parts} did not complete; rerun "
                + "; ".join(c for c in cmds if c) + ("; then " if any(cmds) else "them, then ")
                + f"`satfuse shard merge {out}`")
    if "stopped" in entry and state.startswith(("STOPPED_EARLY", "CANCELLED", "TIMEOUT")):
        stop = entry["stopped"]
        return (f"stopped by {stop.get('why', '?')}; checkpoint saved: submit the same command again "
                "to continue")
    if entry["kind"] == "shard" and first in ("ENDED", "CANCELLED", "FAILED", "TIMEOUT"):
        return f"rerun this part: {part_command(entry)}" if part_command(entry) else ""
    return ""


def _said(state: str) -> str:
    return "ended without a result: cancelled or killed" if state == "ENDED" else state


def part_command(entry: dict[str, Any]) -> str:
    """The plain `satfuse shard` command that redoes one array part (empty when not recorded)."""
    need = ("src", "dataset", "out", "num_shards", "part")
    if not all(k in entry for k in need):
        return ""
    cmd = (f"`satfuse shard --src {entry['src']} --dataset {entry['dataset']} --out {entry['out']} "
           f"--num-shards {entry['num_shards']} --shard-index {entry['part']}")
    for key in ("maxcount", "seed", "workers"):
        if entry.get(key) is not None:
            cmd += f" --{key} {entry[key]}"
    enc = entry.get("encoding") or {}  # the same encoding flags, or the part would not merge
    for key, flag in (("compress", "--compress"), ("level", "--compress-level"), ("s1_dtype", "--s1-dtype")):
        if enc.get(key) is not None:
            cmd += f" {flag} {enc[key]}"
    if enc.get("no_labels"):
        cmd += " --no-labels"
    return cmd + "`"


def split_elsewhere(run_dir: Path, entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(this run dir's entries, entries recorded by another run dir: see `origin`)."""
    mine = [e for e in entries if origin(run_dir, e) is None]
    return mine, [e for e in entries if origin(run_dir, e) is not None]


def list_jobs(run_dir: Path, trust: bool = False) -> list[dict[str, Any]]:
    """Every recorded job with its state (and `hint`/`error` where there is something to do)."""
    jobs = read_index(run_dir)
    mine, _ = split_elsewhere(run_dir, jobs)
    queue, foreign = own_queue(mine)
    rows = []
    for j in jobs:
        where = origin(run_dir, j)
        if where is not None:
            rows.append({**j, "state": "ELSEWHERE", "_origin": str(where)})
            continue
        row = {**j, "state": job_state(j, queue, frozenset(foreign), trust)}
        rec = read_outcome(j["folder"], j["job_id"])
        if rec is not None and rec.get("error") and row["state"] == rec["state"]:
            row["error"] = str(rec["error"])
        rows.append(row)
    by_id = {r["job_id"]: {**r, "_state": r["state"]} for r in rows}
    for r in rows:
        hint = _hint(r, r["state"], by_id)
        if r.get("error"):  # what the task (or a setup line) recorded, then what to do
            hint = f"{r['error']}; " + (hint or f"see `satfuse jobs logs {run_dir} --job {r['job_id']}`")
        if hint:
            r["hint"] = hint
        r.pop("_origin", None)
    return rows


def active_jobs(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The run's jobs of `kind` that are queued or running now (this run's, verified)."""
    rows = list_jobs(run_dir)
    return [r for r in rows if r["kind"] == kind and r["state"].split()[0] in ACTIVE]


def run_progress(run_dir: Path) -> dict[str, Any]:
    """What the trainer left in the run dir: latest checkpoint and last metrics line."""
    info: dict[str, Any] = {}
    layout = RunLayout(run_dir)
    latest = layout.checkpoints / LATEST
    if latest.is_file():
        info["latest_checkpoint"] = latest.read_text().strip()
    metrics = layout.metrics
    if metrics.is_file():
        lines = metrics.read_text(errors="replace").strip().splitlines()
        for back, line in enumerate(reversed(lines)):  # a torn last line (a kill mid-write): the one before
            try:
                info["last_metrics"] = json.loads(line)
            except json.JSONDecodeError:
                continue
            if back:
                info["metrics_note"] = f"{metrics}: last {back} line(s) unreadable (torn write?); showing the one before"
            break
    return info


def scontrol_show(job_id: str) -> dict[str, str]:
    if shutil.which("scontrol") is None:
        return {}
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id],
                         capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        return {}
    return parse_scontrol(res.stdout.splitlines()[0] if res.stdout.strip() else "")


SCONTROL_KEYS = ("JobState", "Reason", "Restarts", "RunTime", "TimeLimit", "NodeList", "Partition", "ExitCode",
                 "NumTasks", "Requeue", "Command")
# a key starts each field; values may hold spaces (Command=/runs/my run/...): split only before KEY=
_FIELD = re.compile(r"(?:^|\s)([A-Z][A-Za-z0-9_:/]*)=")


def parse_scontrol(line: str) -> dict[str, str]:
    """The fields `status` shows from one `scontrol show job -o` line."""
    marks = list(_FIELD.finditer(line))
    fields: dict[str, str] = {}
    for m, nxt in zip(marks, [*marks[1:], None], strict=True):
        if m.group(1) in SCONTROL_KEYS:
            fields[m.group(1)] = line[m.end():nxt.start() if nxt else len(line)].strip()
    return fields


def status(run_dir: Path, trust: bool = False) -> dict[str, Any]:
    jobs = list_jobs(run_dir, trust)
    for j in jobs:
        if j["executor"] == "slurm" and j["state"] not in ("GONE", "ELSEWHERE"):
            info = scontrol_show(j["job_id"])
            if info and owns(j, info.get("Command", "")):
                j["slurm"] = info
    return {"run_dir": str(run_dir), "jobs": jobs, **run_progress(run_dir)}


# --------------------------------------------------------------------------------------------
# Logs and cancel
# --------------------------------------------------------------------------------------------


def select_all(run_dir: Path, job_id: str | None) -> list[dict[str, Any]]:
    """The entries `--job ID` names: one job, or every part of the array `ID` (as `submit` printed it)."""
    jobs = read_index(run_dir)
    if not jobs:
        raise SatfuseError(f"{RunLayout(run_dir).jobs_index}: no jobs recorded")
    if job_id is None:
        return [jobs[-1]]
    found = [j for j in jobs if j["job_id"] == job_id] or [j for j in jobs if j["job_id"].split("_")[0] == job_id]
    if not found:
        raise SatfuseError(f"job {job_id} is not in {RunLayout(run_dir).jobs_index}; known: {[j['job_id'] for j in jobs]}")
    return found


def select(run_dir: Path, job_id: str | None) -> dict[str, Any]:
    found = select_all(run_dir, job_id)
    if len(found) > 1:
        raise SatfuseError(f"{job_id} is a job array of {len(found)} parts in {RunLayout(run_dir).jobs_index}; pass one of "
                           f"{[j['job_id'] for j in found]} with --job")
    return found[0]


def log_text(entry: dict[str, Any], task: int = 0, stream: str = "stderr", tail: int = 0,
             run_dir: Path | None = None) -> str:
    """stdout/stderr of one task (appended across requeues), read from `run_dir`'s own folder."""
    folder = submitit_folder(run_dir) if run_dir is not None else Path(entry["folder"])
    paths = _paths(entry, task, folder)
    path = paths.stderr if stream == "stderr" else paths.stdout
    tasks = int(entry.get("tasks", 1) or 1)
    if not 0 <= task < tasks:
        raise SatfuseError(f"job {entry['job_id']} has no task {task}: it has {tasks} task(s); pass --task "
                           f"0..{tasks - 1}")
    if not folder.is_dir():
        raise SatfuseError(
            f"{folder}: the submitit folder was deleted, and with it the logs of job {entry['job_id']}; "
            "the run's checkpoints and metrics.jsonl are unaffected (`satfuse jobs status` shows them)"
        )
    if not path.is_file():
        if run_dir is not None and origin(run_dir, entry) is not None:
            raise SatfuseError(f"{path}: no log in this copy; job {entry['job_id']} was recorded by "
                               f"{origin(run_dir, entry)}: see `satfuse jobs logs {origin(run_dir, entry)}`")
        state = job_state(entry, *own_queue([entry]))
        if state.split()[0] in ("PENDING", "CONFIGURING"):
            raise SatfuseError(f"{path}: no log yet (job {entry['job_id']} is {state}: task {task} has not started)")
        raise SatfuseError(f"{path}: no log; job {entry['job_id']} is {state} and wrote none "
                           "(it never started, or the file was deleted)")
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-tail:] if tail > 0 else lines)


def cancel(run_dir: Path, job_id: str | None = None) -> list[str]:
    """Cancel the run's jobs that are still queued or running (or only `job_id`).

    Only jobs SLURM confirms as this run's are cancelled (see the module docstring); the
    cancellation is recorded first, so a task that is saving right now does not requeue.
    """
    return cancel_report(run_dir, job_id)["cancelled"]


def cancel_report(run_dir: Path, job_id: str | None = None) -> dict[str, list[str]]:
    """`cancel`, also naming the ids that now belong to other runs' jobs ("gone", left alone) and
    the jobs recorded by the run dir this one was copied from ("elsewhere", left alone).

    `job_id` may be an array id (as `submit` printed it): every part of that array."""
    listed = read_index(run_dir) if job_id is None else select_all(run_dir, job_id)
    jobs, elsewhere = split_elsewhere(run_dir, listed)
    for j in elsewhere:
        log.warning("job %s in %s was recorded by %s (this run dir is a copy of it, or was moved): left alone; "
                    "cancel it from there: `satfuse jobs cancel %s`", j["job_id"], RunLayout(run_dir).jobs_index,
                    origin(run_dir, j), origin(run_dir, j))
    queue, foreign = own_queue(jobs)
    for j in foreign:
        log.warning("job %s of %s is gone: that id now belongs to another run's job, left alone", j, run_dir)
    slurm_ids = [j["job_id"] for j in jobs if j["executor"] == "slurm"]
    cancelled = [j for j in slurm_ids if j in queue]
    if cancelled:
        mark_cancelled(run_dir, cancelled)
        res = subprocess.run(["scancel", *sorted(set(cancelled))], capture_output=True, text=True,
                             timeout=60, check=False)
        if res.returncode != 0:
            raise SatfuseError(f"scancel {' '.join(cancelled)} failed: {res.stderr.strip()}")
    for j in jobs:
        if j["executor"] == "local" and local_alive(j) and result_state(j) == "UNKNOWN":
            mark_cancelled(run_dir, [j["job_id"]])
            os.kill(int(j["job_id"]), signal.SIGINT)  # submitit's local controller stops its tasks
            cancelled.append(j["job_id"])
    return {"cancelled": cancelled, "gone": foreign, "elsewhere": [j["job_id"] for j in elsewhere]}
