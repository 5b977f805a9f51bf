"""What runs inside each submitit task: pretraining (requeued on preemption) and sharding parts.

The preemption path, end to end (read submitit 1.5.4's `job_environment.py` to see why):

1. SLURM sends the profile's signal (USR2 by default, `--signal=USR2@120`) to every task,
   or an admin/test runs `scontrol requeue` / `scancel --signal=USR2`.
2. The trainer installed its own handlers for USR1/USR2/TERM/HUP on *every* rank (after
   submitit's, which only act on global rank 0). At the next step boundary all ranks agree
   (all-reduce), save one checkpoint together and `run_pretrain` returns 75.
3. Here, on 75: rank 0 asks SLURM to requeue the job (`scontrol requeue $SLURM_JOB_ID`);
   every rank leaves without writing a submitit result (the job is not over) and with
   status 0 (sites with KillOnBadExit would otherwise kill rank 0 before it requeues).
4. SLURM restarts the same batch script: same submitit folder (logs are opened in append
   mode), same pickled `PretrainTask`, same `train.run_dir`; the trainer resumes from
   `checkpoints/latest`. `SLURM_RESTART_COUNT` counts the requeues; past
   `train.max_requeues` the task stops with a clear error instead of requeueing forever.

If a signal lands before the trainer has installed its handlers, submitit's own handler
does the same on rank 0 through `checkpoint()` (this class is `Checkpointable`), so no
window loses the job.

Cancel means cancel. SIGTERM is `scancel` (or SLURM ending a time limit or a preemption
grace time, after which SLURM requeues a preempted job itself): the trainer saves if there
is time and returns `STOP_EXIT_CODE` (143), and the task leaves WITHOUT requeueing. A TERM
that comes after the requeue signal wins too, up to the moment rank 0 requeues: the trainer
turns it into 143 while it saves, and after it returned 75 rank 0 asks again, right before
`scontrol requeue` (a TERM this process caught, `signals.term_seen`, or SLURM no longer
listing the job as RUNNING: `scancel` marks it COMPLETING before its TERM reaches the
tasks; `scontrol requeue` would revive even a cancelled job). And a job that `satfuse jobs
cancel` recorded as cancelled in `jobs.json` is never requeued by the task, whatever signal
it got; if SLURM starts it again anyway, it leaves at once.

A run that stops before `train.steps` never passes for a finished one: rank 0 exits with the
trainer's code (143 after TERM; 75 after the requeue signal when the profile says
`requeue: false`, which also submits with `--no-requeue`), so SLURM records a non-zero exit
code, and writes `stopped` (step, train.steps, why) into the job's `jobs.json` entry, which
`satfuse jobs ls|status` show (`STOPPED_EARLY at step N/M`). The other ranks exit 0, so
a site's KillOnBadExit cannot kill rank 0 before it wrote that record.

Each task's place in the job and the rendezvous port come from
`satfuse.distributed.launcher_env.world_info_from_env` (the same reader the trainer uses),
with the restart count passed in: the port is derived from the job id *and* the restart
count, so all tasks agree without talking, and a requeued job does not hit its previous
port. Tasks leave through `satfuse.distributed.env.exit_cleanly`.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import submitit

from satfuse.config import TrainConfig
from satfuse.distributed.env import exit_cleanly
from satfuse.distributed.launcher_env import torchrun_vars, world_info_from_env
from satfuse.exit_codes import REQUEUE_EXIT_CODE, STOP_EXIT_CODE
from satfuse.utils import SatfuseError, atomic_write_text, setup_logging

log = logging.getLogger(__name__)

DEFAULT_ENTRY = "satfuse.engines.pretrain:run_pretrain"
LOCAL_REQUEUE_EXIT_CODE = 144  # submitit.local restarts all tasks when one exits with this
BY_TERM = "SIGTERM (scancel, a kill from outside, or SLURM ending/preempting the job)"


def resolve_entry(spec: str) -> Callable[[str | None, list[str]], int]:
    """`module:function` -> the function (the trainer by default; tests may pass their own)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SatfuseError(f"entry {spec!r} is not 'module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SatfuseError(f"entry {spec!r} cannot be imported in the job ({exc}); check PYTHONPATH/the venv") from exc


def is_local(env: Any) -> bool:
    return env.cluster == "local"


def restart_count(env: Any) -> int:
    """How often this job was requeued: SLURM counts it; the local executor needs a file."""
    if not is_local(env):
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    path = _local_restart_file(env)
    return int(path.read_text()) if path.is_file() else 0


def _local_restart_file(env: Any) -> Path:
    return Path(os.environ["SUBMITIT_FOLDER"]) / f".restarts_{env.job_id}"


def _exit_after_result(env: Any) -> None:
    """At interpreter exit, after submitit wrote the result: `exit_cleanly` (gloo threads
    abort a normal interpreter shutdown about 1 run in 3)."""
    result = env.paths.result_pickle

    def _bye() -> None:
        exit_cleanly(0 if result.exists() else 1)

    atexit.register(_bye)


class PretrainTask(submitit.helpers.Checkpointable):
    """One pretraining task (one rank). Pickled once; every requeue runs the same object."""

    requeue: bool = True  # class default too: a task pickled before this field existed requeues as it did

    def __init__(self, config_path: str | None, overrides: list[str], entry: str = DEFAULT_ENTRY,
                 requeue: bool = True) -> None:
        self.config_path = config_path
        self.overrides = list(overrides)
        self.entry = entry
        self.requeue = requeue  # the profile's `requeue`: false = save on the signal and stop

    def __call__(self) -> int:
        from satfuse.config import PretrainConfig, load_config

        env = submitit.JobEnvironment()
        cfg = load_config(PretrainConfig, self.config_path, self.overrides)
        restart = restart_count(env)
        os.environ.update(torchrun_vars(world_info_from_env(restart=restart)))
        setup_logging(rank=env.global_rank)
        log.info(
            "task rank %d/%d (local %d) job %s attempt %d: master %s:%s, run dir %s",
            env.global_rank, env.num_tasks, env.local_rank, env.job_id, restart + 1,
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], cfg.train.run_dir,
        )  # fmt: skip
        if self._cancelled(env, cfg.train.run_dir):
            log.warning("job %s was cancelled with `satfuse jobs cancel` (jobs.json); not training", env.job_id)
            exit_cleanly(0)
        if restart > 0 and env.global_rank == 0:  # this attempt is running: an earlier stop is history
            from satfuse.launch.jobs import record_stop

            record_stop(Path(cfg.train.run_dir), str(env.job_id), None)
        code = int(resolve_entry(self.entry)(self.config_path, self.overrides) or 0)
        if code == 0:
            if env.num_tasks > 1:
                _exit_after_result(env)
            return 0
        if code == REQUEUE_EXIT_CODE and _term_seen():
            log.warning("SIGTERM arrived after the checkpoint for the requeue signal: stopping for good")
            code = STOP_EXIT_CODE
        if code == STOP_EXIT_CODE:
            self._stop(env, cfg.train, BY_TERM, code)
        if code == REQUEUE_EXIT_CODE:
            if self._cancelled(env, cfg.train.run_dir):
                log.warning("job %s was cancelled with `satfuse jobs cancel`: checkpoint saved, not requeueing",
                            env.job_id)
                exit_cleanly(0)
            if not self.requeue:
                self._stop(env, cfg.train, "the requeue signal, with requeue: false in the cluster profile", code)
            self._requeue(env, restart, cfg.train)
        raise SatfuseError(
            f"pretraining rank {env.global_rank} of job {env.job_id} exited with status {code}; "
            f"see `satfuse jobs logs {cfg.train.run_dir}`"
        )

    @staticmethod
    def _stop(env: Any, train: TrainConfig, why: str, code: int) -> NoReturn:
        """Saved and stopped before train.steps, not requeued: say so in the log, in the job's exit
        code (rank 0: `code`, never 0) and in jobs.json (rank 0), at which step."""
        from satfuse.launch.jobs import record_stop, run_progress

        run_dir = Path(train.run_dir)
        latest = run_progress(run_dir).get("latest_checkpoint", "")
        step = int(latest.rsplit("_", 1)[-1]) if latest.rsplit("_", 1)[-1].isdigit() else None
        at = "?" if step is None else step
        if env.global_rank != 0:  # rank 0 says why, records it and sets the job's exit status
            log.info("rank %d saved and leaves (%s); task 0's log says whether the job comes back",
                     env.global_rank, why)
            exit_cleanly(0)
        if code == STOP_EXIT_CODE and not is_local(env) and _slurm_requeueing(str(env.job_id), restart_count(env)):
            # `scontrol requeue` (by hand or the scheduler's preemption) sends this TERM: SLURM
            # itself brings the job back, so this is no stop and nothing is recorded as one
            log.warning("job %s is being requeued by SLURM itself (`scontrol requeue` or a preemption): checkpoint "
                        "saved at step %s; the next attempt resumes from it", env.job_id, at)
            exit_cleanly(0)
        log.warning("job %s stopped by %s at step %s of %d: checkpoint saved in %s/checkpoints; not requeueing "
                    "(submit the same command again to continue)", env.job_id, why, at, train.steps, run_dir)
        record_stop(run_dir, str(env.job_id), {"step": step, "steps": train.steps, "why": why, "exit_code": code,
                                               "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        exit_cleanly(code)

    def _requeue(self, env: Any, restart: int, train: TrainConfig) -> None:
        """Checkpoint saved by the trainer: requeue (rank 0) and leave, or stop past the limit."""
        max_requeues, run_dir = train.max_requeues, train.run_dir
        if restart >= max_requeues:
            raise SatfuseError(
                f"job {env.job_id} was requeued {restart} times (train.max_requeues={max_requeues}) and "
                f"was stopped again; not requeueing. The last checkpoint is in {run_dir}/checkpoints: "
                "submit the same command again to continue, or raise train.max_requeues"
            )
        if is_local(env):
            if env.global_rank == 0:
                atomic_write_text(_local_restart_file(env), str(restart + 1))
            log.warning("checkpoint saved; restarting the local job (requeue %d)", restart + 1)
            exit_cleanly(LOCAL_REQUEUE_EXIT_CODE)
        if env.global_rank == 0:
            ending = _slurm_ending(str(env.job_id))  # asked last, right before the requeue
            if ending or _term_seen():
                self._stop(env, train, f"SIGTERM (scancel: SLURM lists the job as {ending})" if ending else BY_TERM,
                           STOP_EXIT_CODE)
            requeue_slurm_job(env.job_id)
            log.warning("checkpoint saved; job %s requeued (requeue %d of at most %d)",
                        env.job_id, restart + 1, max_requeues)
        exit_cleanly(0)

    @staticmethod
    def _cancelled(env: Any, run_dir: str) -> bool:
        from satfuse.launch.jobs import is_cancelled

        return is_cancelled(Path(run_dir), str(env.job_id))

    def _run_dir(self) -> str | None:
        runs = [o.split("=", 1)[1] for o in self.overrides if o.startswith("train.run_dir=")]
        return runs[-1] if runs else None

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """submitit's fallback (signal before the trainer's handlers): resubmit as is.

        All state lives in the run directory's checkpoints, so the same task resumes there.
        A job cancelled with `satfuse jobs cancel` leaves instead; with `requeue: false` submitit
        gets None and ends the job with an error result (stopped before the end, not requeued).
        """
        if not self.requeue:
            log.warning("requeue: false in the cluster profile: not requeueing (submit the same command again)")
            return None
        run_dir = self._run_dir()
        if run_dir is not None and self._cancelled(submitit.JobEnvironment(), run_dir):
            log.warning("job was cancelled with `satfuse jobs cancel`: not requeueing")
            exit_cleanly(0)
        log.warning("submitit checkpoint(): requeueing the task unchanged; it resumes from its run dir")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _term_seen() -> bool:
    """Whether the trainer's stop flag caught SIGTERM in this process (imported late: torch)."""
    from satfuse.engines.signals import term_seen

    return term_seen()


def _slurm_ending(job_id: str) -> str:
    """SLURM's state of this running job when it is no longer RUNNING (scancel marks it
    COMPLETING at once), else ''. Unknown (scontrol failed) counts as running."""
    from satfuse.launch.jobs import scontrol_show

    state = scontrol_show(job_id).get("JobState", "")
    return state if state and state != "RUNNING" else ""


def _slurm_requeueing(job_id: str, restart: int) -> bool:
    """Whether SLURM is requeueing this job itself: its restart count is already past this
    attempt's (`scontrol requeue` raises `Restarts` before the TERM reaches the tasks, while the
    task's SLURM_RESTART_COUNT still says this attempt). Unknown (scontrol failed) is no."""
    from satfuse.launch.jobs import scontrol_show

    restarts = scontrol_show(job_id).get("Restarts", "")
    return restarts.isdigit() and int(restarts) > restart


def requeue_slurm_job(job_id: str) -> None:
    """`scontrol requeue JOB` (the job must be requeueable: `--requeue`, set by the profiles)."""
    try:
        res = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True,
                             timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SatfuseError(f"scontrol requeue {job_id} failed ({exc}); the checkpoint is saved: resubmit") from exc
    if res.returncode != 0:
        if "pending" in res.stderr.lower() or _already_requeued(job_id):
            # an admin or the scheduler requeued it (`scontrol requeue`, preemption): SLURM sent
            # the TERM that made us save; nothing left to do but leave
            log.info("job %s was already requeued by SLURM", job_id)
            return
        raise SatfuseError(
            f"scontrol requeue {job_id} failed ({res.stderr.strip()}); the checkpoint is saved: resubmit"
        )


def _already_requeued(job_id: str) -> bool:
    res = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                         timeout=60, check=False)
    return bool(set(res.stdout.split()) & {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"})


# --------------------------------------------------------------------------------------------
# Sharding as a job array
# --------------------------------------------------------------------------------------------


@dataclass
class ShardPart:
    """Part `index` of `num_shards` of the sharding tool (one array task)."""

    src: str
    dataset: str
    out: str
    num_shards: int
    maxcount: int | None = None
    workers: int | None = None
    seed: int | None = None
    encoding: dict[str, Any] | None = None  # codecs.make_encoding keywords (--compress, --s1-dtype, --no-labels)

    def __call__(self, index: int) -> Any:
        from satfuse.data.format.codecs import make_encoding
        from satfuse.data.packing.shard_writer import shard_dataset

        setup_logging()
        kwargs: dict[str, Any] = {k: v for k, v in (("maxcount", self.maxcount), ("workers", self.workers),
                                                    ("seed", self.seed)) if v is not None}
        if self.encoding:
            kwargs["encoding"] = make_encoding(**self.encoding)
        log.info("shard part %d of %d: %s -> %s", index, self.num_shards, self.src, self.out)
        result = shard_dataset(self.src, self.dataset, self.out, shard_index=index,
                               num_shards=self.num_shards, **kwargs)
        return _plain(result)


def merge_shards(out: str) -> Any:
    """The dependent job after the array: join the part manifests into manifest.json."""
    from satfuse.data.packing.shard_dir import merge

    setup_logging()
    log.info("merging shard parts in %s", out)
    return _plain(merge(out))


def _plain(value: Any) -> Any:
    """Results travel back in a pickle: keep them to plain data (paths as strings)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
