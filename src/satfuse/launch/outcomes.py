"""How a task ended, recorded as JSON beside submitit's files: never a pickle to load.

Why: submitit's `*_result.pkl` are pickles, and loading one runs whatever its author put in
it (run dirs are shared), so `satfuse jobs` reads these records instead. `recorded` wraps
every submitted callable (COMPLETED with a plain result, or FAILED with the error's last
line, written before submitit pickles the result); `setup_guard` makes a failing profile
`setup:` line fail the job there and write the same FAILED record from the batch script.
The index of a run's jobs, which reads these records, is `satfuse.launch.jobs`.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from satfuse.run_layout import OUTCOME, outcome_record
from satfuse.utils import atomic_write_text

log = logging.getLogger(__name__)


def write_outcome(state: str, **fields: Any) -> None:
    """In a task: record how it ended (this task's `OUTCOME` file, atomically)."""
    import submitit  # lazy: --help stays fast (submitit; this runs in a task)

    env = submitit.JobEnvironment()
    path = outcome_record(env.paths.folder, str(env.job_id), env.global_rank)
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        atomic_write_text(path, json.dumps({"state": state, "ended": when, **fields}) + "\n")
    except OSError as exc:  # the job's own result stands; only `jobs ls` loses its record
        log.warning("%s: could not record the outcome %s (%s)", path, state, exc)


def read_outcome(folder: Path | str, job_id: str, task: int = 0) -> dict[str, Any] | None:
    """A task's outcome record, or None when there is none (an unreadable one is said, not used)."""
    path = outcome_record(folder, job_id, task)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable outcome record (%s); ignored", path, exc)
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("state"), str) or not rec["state"].isupper():
        log.warning("%s: not an outcome record ({\"state\": \"COMPLETED\", ...}); ignored", path)
        return None
    return rec


class RecordOutcome:
    """A submitted callable that records how it ended as JSON (see the module docstring).

    The record is written in the task, before submitit pickles the result, so `satfuse jobs`
    never needs to unpickle anything to tell COMPLETED from FAILED. A task that leaves without
    a result (stopped, requeued: `os._exit`) writes none: SLURM's state says what happened.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            value = self.fn(*args, **kwargs)
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            write_outcome("FAILED", error=f"{type(exc).__name__}: {lines[-1] if lines else ''}".strip())
            raise
        try:  # plain results travel in the record too (`submit --wait` prints them)
            write_outcome("COMPLETED", result=json.loads(json.dumps(value)))
        except (TypeError, ValueError):
            write_outcome("COMPLETED", result_note=f"a {type(value).__name__}, not JSON: not recorded")
        return value


class RecordCheckpointable(RecordOutcome):
    """`RecordOutcome` of a Checkpointable task: submitit's requeue fallback still reaches it."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission  # lazy: --help stays fast (submitit)

        again = self.fn.checkpoint(*args, **kwargs)
        if again is None:
            return None
        return DelayedSubmission(RecordCheckpointable(again.function), *again.args, **again.kwargs)


def recorded(fn: Any) -> RecordOutcome:
    """`fn`, wrapped to record its outcome (keeping submitit's checkpoint hook when it has one)."""
    return RecordCheckpointable(fn) if hasattr(fn, "checkpoint") else RecordOutcome(fn)


def setup_guard(lines: list[str], folder: Path | None) -> list[str]:
    """The profile's setup lines, each failing the job at once with a message and a record.

    Why: a batch script runs on after a failing line (`module load nonexistent` gave a
    COMPLETED job), and `false` ended the job before any log line was written. Each line runs
    as `{ LINE\n} || { report; exit STATUS; }` (braces: `source`/`export` keep their effect);
    the report goes to the job's stderr log (task 0's, what `satfuse jobs logs` shows) and,
    under SLURM, into task 0's outcome record (what `jobs ls|status` show).
    """
    out = []
    for i, line in enumerate(lines, 1):
        said = f"profile setup line {i} failed"
        record = ""
        if folder is not None:
            rec = json.dumps({"state": "FAILED", "error": f"{said}: {line}", "stage": "setup"})[:-1]
            target = shlex.quote(str(folder)) + "/" + OUTCOME.format(job='"$_sf_id"', task=0)
            record = ('_sf_id=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}; '
                      '_sf_id=${_sf_id:-$SLURM_JOB_ID}; '
                      f'[ -n "$_sf_id" ] && printf \'%s, "exit_code": %s}}\\n\' {shlex.quote(rec)} "$_rc" '
                      f'> {target}.tmp && mv -f {target}.tmp {target}; ')
        out.append(f"{{ {line}\n}} || {{ _rc=$?; printf 'satfuse: {said} with status %s: %s; fix setup: in the "
                   f"cluster profile\\n' \"$_rc\" {shlex.quote(line)} >&2; {record}exit $_rc; }}")
    return out
