"""`satfuse submit pretrain|shard`: validate everything, then queue through submitit.

Order matters: the pretraining config and the cluster profile are loaded strictly, the
partition is checked and `sbatch --test-only` judges the exact script *before* submitit is
asked to queue anything, so a typo never costs a place in the queue. `--dry-run` prints that
script and queues nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from satfuse.config import PretrainConfig, load_config, validate_pretrain
from satfuse.data.packing.shard_dir import check_paths, claim_problem, prepare_out
from satfuse.engines.rundir import live_holder
from satfuse.launch import cluster, jobs
from satfuse.launch.cluster import ClusterProfile
from satfuse.launch.outcomes import read_outcome, recorded
from satfuse.launch.task import DEFAULT_ENTRY, PretrainTask, ShardPart, merge_shards
from satfuse.registry import ENGINES
from satfuse.resources import resolve_config
from satfuse.run_layout import RunLayout
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)


@dataclass
class Submission:
    """What a submit command produced (printed as JSON)."""

    run_dir: str
    executor: str
    jobs: list[dict[str, Any]] = field(default_factory=list)
    results: list[Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run_dir": self.run_dir, "executor": self.executor, "jobs": self.jobs}
        if self.results is not None:
            out["results"] = self.results
        return out


def _job_name(prefix: str, run_dir: Path) -> str:
    return f"satfuse-{prefix}-{Path(run_dir).resolve().name}"


DRY_RUN_HEADER = """\
# Printed by `satfuse submit --dry-run`: NOT runnable as printed; for reading and for `sbatch --test-only` only.
# The job needs the pickled task that `satfuse submit` writes into its submitit folder, which does
# not exist yet: so its --output/--error lines are disabled here (##SBATCH). Given to sbatch anyway,
# it writes slurm-<job id>.out in the directory sbatch ran in and stops there with a message.
# Queue the job with the same command without --dry-run.
"""
DRY_RUN_GUARD = ('echo "this script was printed by satfuse submit --dry-run and cannot run: queue the job with '
                 'the same satfuse submit command without --dry-run" >&2\nexit 2\n')


LOG_FLAGS = ("#SBATCH --output=", "#SBATCH --error=")


def dry_run_script(script: str) -> str:
    """The sbatch script, marked as for reading: a header, and a guard after the #SBATCH lines.

    The log flags point into the submitit folder that only a real submit creates; SLURM
    cannot open them and the job would fail with no log (JobLaunchFailure), hiding the guard's
    message. Disabled, SLURM writes its default slurm-<id>.out, where the message lands.
    """
    lines = ["#" + ln if ln.startswith(LOG_FLAGS) else ln for ln in script.splitlines(keepends=True)]
    head = 1 if lines and lines[0].startswith("#!") else 0
    last = max((i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")), default=head - 1)
    return "".join(lines[:head] + [DRY_RUN_HEADER] + lines[head:last + 1] + [DRY_RUN_GUARD] + lines[last + 1:])


def _emit_dry_run(profile: ClusterProfile, script: str | None, extra: str = "") -> None:
    """The command's real output: the sbatch script (slurm) or what the local executor would run."""
    if profile.executor == "local":
        sys.stdout.write(f"# local executor (no sbatch): {profile.tasks} task(s), time {profile.time}\n{extra}")
    else:
        sys.stdout.write(dry_run_script(script or ""))
    sys.stdout.flush()


def refuse_if_running(run_dir: Path, lease_timeout_s: float) -> None:
    """Two jobs must never train one run dir: refuse while jobs.json's pretraining job is queued or
    running, or while another run (e.g. a plain `satfuse pretrain`) holds the run dir's lease."""
    holder = live_holder(run_dir, lease_timeout_s)
    if holder is not None:
        raise SatfuseError(
            f"{run_dir}: another run is writing this run dir ({holder}); nothing queued: wait for it to end, "
            "stop it, or pass another train.run_dir"
        )
    if not RunLayout(run_dir).jobs_index.is_file():
        return
    active = jobs.active_jobs(run_dir, "pretrain")
    if active:
        j = active[-1]
        raise SatfuseError(
            f"{run_dir}: pretraining job {j['job_id']} ({j['executor']}) is {j['state'].split()[0]} in this run "
            f"dir ({RunLayout(run_dir).jobs_index}); wait for it to end, stop it with `satfuse jobs cancel {run_dir}`, "
            "or pass another train.run_dir"
        )


# --------------------------------------------------------------------------------------------
# pretrain
# --------------------------------------------------------------------------------------------


def submit_pretrain(config: str | None, overrides: list[str], profile: ClusterProfile, where: str,
                    dry_run: bool = False, wait: bool = False, entry: str = DEFAULT_ENTRY) -> Submission | None:
    """Queue one job of `profile.nodes x tasks` tasks, each running `PretrainTask`."""
    cfg = load_config(PretrainConfig, config, overrides)  # a bad config fails here, not in the queue
    validate_pretrain(cfg)  # ranges too
    ENGINES.get(cfg.train.engine).check_installed(config or "command line")
    run_dir = Path(cfg.train.run_dir).resolve()
    # the job's working directory may differ: pin the run dir to an absolute path
    overrides = [o for o in overrides if not o.startswith("train.run_dir=")] + [f"train.run_dir={run_dir}"]
    config = str(resolve_config(config, "pretrain").resolve()) if config else None  # a name, too
    folder = jobs.submitit_folder(run_dir)
    name = _job_name("pretrain", run_dir)
    script = cluster.sbatch_script(profile, folder, name) if profile.executor == "slurm" else None
    if dry_run:
        _emit_dry_run(profile, script)
        return None
    with jobs.submitting(run_dir):  # from the checks to the recorded job: one submit at a time
        refuse_if_running(run_dir, cfg.train.lease_timeout_s)
        if script is not None:
            cluster.preflight(profile, where, script)
        ex = cluster.make_executor(profile, folder, name, max_requeues=cfg.train.max_requeues)
        job = ex.submit(recorded(PretrainTask(config, overrides, entry=entry, requeue=profile.requeue)))
        entry_rec = jobs.job_entry(job, "pretrain", profile.executor, profile.world_size,
                                   config=config, overrides=overrides, cluster=where)
        jobs.record_jobs(run_dir, [entry_rec])
    log.info("submitted pretraining job %s (%d tasks) -> %s", job.job_id, profile.world_size, run_dir)
    sub = Submission(str(run_dir), profile.executor, [entry_rec])
    if wait:
        sub.results = [_wait(job)]
    return sub


def _wait(job: Any, poll_s: float = 1.0) -> Any:
    """Block until the job ended; its tasks' results (one value, or one per task).

    Polls the tasks' JSON outcome records and `squeue`, never `sacct` (absent on clusters
    without accounting, where submitit's own wait could spin forever on a job that died
    without a result), and never unpickles submitit's result files (see `jobs`).
    """
    paths = [job.paths] if not job._sub_jobs else [s.paths for s in job._sub_jobs]
    gone = 0
    while not all(recs := [read_outcome(p.folder, str(p.job_id), p.task_id) for p in paths]):
        if job.__class__.__name__ == "LocalJob":
            ended = job.done()
        else:
            ended = str(job.job_id) not in jobs.squeue_states([str(job.job_id)])
        gone = gone + 1 if ended else 0
        if gone >= 3:  # ended (seen thrice, requeues pass through PENDING) without a result
            raise SatfuseError(f"job {job.job_id} ended without a result; see its logs in {job.paths.folder}")
        time.sleep(poll_s)
    failed = [r for r in recs if r and r["state"] != "COMPLETED"]
    if failed:
        raise SatfuseError(f"job {job.job_id} failed: {failed[0].get('error', failed[0]['state'])}; see its logs "
                           f"in {job.paths.folder}")
    out = [r.get("result") if r else None for r in recs]
    return out[0] if len(out) == 1 else out


# --------------------------------------------------------------------------------------------
# shard
# --------------------------------------------------------------------------------------------


def submit_shard(part: ShardPart, array_size: int, run_dir: Path, profile: ClusterProfile, where: str,
                 dry_run: bool = False, wait: bool = False, overwrite: bool = False) -> Submission | None:
    """An array of `array_size` sharding tasks (disjoint parts), then the merge as a dependent job.

    The output directory is judged here, before queueing, by the rules every part applies
    (`shard_dir.claim_problem`): a directory the parts would refuse fails the submit, not every
    part. `overwrite` empties it here, once, before the parts are queued (each part emptying it
    would race with the others).
    """
    if array_size < 1:
        raise SatfuseError(f"--array-size must be >= 1, got {array_size}")
    if not Path(part.src).is_dir():
        raise SatfuseError(f"{part.src}: source directory not found; pass --src with the raw dataset root")
    out = Path(part.out)
    check_paths(Path(part.src).resolve(), out)
    problem = None if overwrite else claim_problem(out, {"dataset": part.dataset})
    if problem is not None:
        raise SatfuseError(f"{problem} (nothing queued)")
    run_dir = run_dir.resolve()
    folder = jobs.submitit_folder(run_dir)
    # array tasks are single-task jobs: one process per part, the profile's CPUs for its workers
    one = _single_task(profile)
    name = _job_name("shard", run_dir)
    if profile.executor == "local":
        if dry_run:
            _emit_dry_run(one, None, f"# {array_size} shard parts, then merge of {part.out}\n")
            return None
        if overwrite:
            prepare_out(out, True, {"dataset": part.dataset})
        return _shard_local(part, array_size, run_dir, folder, one, name)
    script = cluster.sbatch_script(one, folder, name, extra={"map_count": array_size})
    if dry_run:
        _emit_dry_run(one, script)
        return None
    cluster.preflight(one, where, script)
    if overwrite:
        prepare_out(out, True, {"dataset": part.dataset})
    ex = cluster.make_executor(one, folder, name, max_requeues=0)
    array = ex.map_array(recorded(part), list(range(array_size)))
    array_id = array[0].job_id.split("_")[0]
    # afterok: the merge only runs if every part succeeded; a failed part cancels it
    merge_ex = cluster.make_executor(one, folder, f"{name}-merge", max_requeues=0,
                                     extra={"dependency": f"afterok:{array_id}"},
                                     sbatch={"kill-on-invalid-dep": "yes"})
    merge_job = merge_ex.submit(recorded(merge_shards), part.out)
    records = [jobs.job_entry(j, "shard", "slurm", 1, part=i, **_part_fields(part)) for i, j in enumerate(array)]
    records.append(jobs.job_entry(merge_job, "merge", "slurm", 1, after=array_id, out=part.out))
    jobs.record_jobs(run_dir, records)
    log.info("submitted shard array %s (%d parts) and merge job %s", array_id, array_size, merge_job.job_id)
    sub = Submission(str(run_dir), "slurm", records)
    if wait:
        sub.results = [_wait(merge_job)]
    return sub


def _part_fields(part: ShardPart) -> dict[str, Any]:
    """What `jobs ls` needs to print the command that redoes one part."""
    fields = {"out": part.out, "src": part.src, "dataset": part.dataset, "num_shards": part.num_shards}
    fields.update({k: getattr(part, k) for k in ("maxcount", "seed", "workers") if getattr(part, k) is not None})
    if part.encoding:
        fields["encoding"] = part.encoding
    return fields


def _single_task(profile: ClusterProfile) -> ClusterProfile:
    return replace(profile, nodes=1, gpus_per_node=0, tasks_per_node=1)


def _shard_local(part: ShardPart, array_size: int, run_dir: Path, folder: Path,
                 profile: ClusterProfile, name: str) -> Submission:
    """Locally there are no dependencies: run the parts, wait, then run the merge."""
    ex = cluster.make_executor(profile, folder, name, max_requeues=0)
    array = ex.map_array(recorded(part), list(range(array_size)))
    records = [jobs.job_entry(j, "shard", "local", 1, part=i, out=part.out) for i, j in enumerate(array)]
    jobs.record_jobs(run_dir, records)
    for j in array:
        _wait(j)
    merge_job = ex.submit(recorded(merge_shards), part.out)
    rec = jobs.job_entry(merge_job, "merge", "local", 1, out=part.out)
    jobs.record_jobs(run_dir, [rec])
    return Submission(str(run_dir), "local", [*records, rec], results=[_wait(merge_job)])


def print_submission(sub: Submission | None) -> int:
    if sub is not None:
        sys.stdout.write(json.dumps(sub.as_dict(), indent=2, default=str) + "\n")
    return 0


def default_shard_run_dir(out: str) -> Path:
    return Path("runs") / f"shard-{Path(out).resolve().name or 'out'}"

