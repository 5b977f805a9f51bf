"""What a run directory holds, by name: the one owner of a run dir's layout; torch-free.

    run_dir/checkpoints/          the committed checkpoints (inside: `satfuse.checkpoint.layout`)
    run_dir/config.yaml           the run's whole config, written at start (pretraining and fine-tuning)
    run_dir/metrics.jsonl         one JSON record per log step (pretraining)
    run_dir/overrides.jsonl       the settings a resume changed, one record per resume
    run_dir/tensorboard/          TensorBoard event files (`log.tensorboard`)
    run_dir/wandb/                W&B's offline run files (`log.wandb`; W&B names it under run_dir)
    run_dir/.lock                 the single writer's lease (`satfuse.engines.rundir.RunLease`)
    run_dir/result.json           a fine-tuning run's scores (its presence: a finished run)
    run_dir/previous-<time>/      an earlier run moved aside by `--force-new-run`
    run_dir/jobs.json             the run's SLURM/local job index (`satfuse.launch.jobs`)
    run_dir/.jobs.lock            serialises read-modify-write of jobs.json
    run_dir/.submit.lock          held by `satfuse submit` from its checks to the recorded job
    run_dir/submitit/             submitit's folder: batch scripts, pickles, the tasks' logs,
                                  satfuse's outcome records and requeue counters

Why one module: the same names used to be spelled as literals in seven modules, so renaming
one (or adding a file a fresh start must move aside) meant finding every copy. The readers
(`satfuse jobs`, `satfuse report`, the run-dir kind check) and the writers (trainer, fine-tuning,
submit) now ask `RunLayout(run_dir)`. Names *inside* checkpoints/ (step_X, latest, meta.json)
belong to `satfuse.checkpoint.layout`; submitit's own file names to submitit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
OVERRIDES = "overrides.jsonl"
TENSORBOARD = "tensorboard"
LEASE = ".lock"
RESULT = "result.json"
SEG_SAMPLES = "seg_samples.npz"
PREVIOUS_PREFIX = "previous-"
JOBS_INDEX = "jobs.json"
JOBS_LOCK = ".jobs.lock"
SUBMIT_LOCK = ".submit.lock"
SUBMITIT = "submitit"
OUTCOME = "{job}_{task}_outcome.json"  # in submitit/: satfuse's JSON record of how one task ended
RESTARTS = ".restarts_{job}"  # in submitit/: a local-executor job's requeue count

# What a pretraining run writes into its run_dir and a forced fresh start moves aside together.
PRETRAIN_RUN_FILES = (CHECKPOINTS, CONFIG, METRICS, OVERRIDES)


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (`root`); building one touches no file."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def checkpoints(self) -> Path:
        """Where the checkpoint protocol commits steps (`checkpoint.layout` names what is inside)."""
        return self.root / CHECKPOINTS

    @property
    def config(self) -> Path:
        """The run's whole config as YAML: what a resume compares its settings against."""
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        """The pretraining metrics, one JSON object per line (what `satfuse report` plots)."""
        return self.root / METRICS

    @property
    def overrides(self) -> Path:
        """The settings each resume changed: the run's history of key=value overrides."""
        return self.root / OVERRIDES

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event directory; a requeued run appends to it."""
        return self.root / TENSORBOARD

    @property
    def lease(self) -> Path:
        """The single writer's lease file: a second run refuses while its holder lives."""
        return self.root / LEASE

    @property
    def result(self) -> Path:
        """A fine-tuning run's result (written last: its presence means the run finished)."""
        return self.root / RESULT

    @property
    def seg_samples(self) -> Path:
        """A segmentation run's first test patches (S2 RGB, label map, prediction) for the
        report's picture: the report reads runs, never the shards or the model again."""
        return self.root / SEG_SAMPLES

    @property
    def jobs_index(self) -> Path:
        """The index of the run's jobs (ids, kind, folder, cancel/stop marks)."""
        return self.root / JOBS_INDEX

    @property
    def jobs_lock(self) -> Path:
        """The flock file serialising updates of jobs.json between processes."""
        return self.root / JOBS_LOCK

    @property
    def submit_lock(self) -> Path:
        """The flock `satfuse submit` holds from its checks until the job is recorded."""
        return self.root / SUBMIT_LOCK

    @property
    def submitit(self) -> Path:
        """submitit's folder for this run's jobs (scripts, logs, outcome records)."""
        return self.root / SUBMITIT

    @property
    def pretrain_files(self) -> tuple[Path, ...]:
        """What a pretraining run writes: a fresh start in a dir holding any of them refuses or
        moves them aside together."""
        return tuple(self.root / name for name in PRETRAIN_RUN_FILES)

    def previous(self, stamp: str) -> Path:
        """Where `--force-new-run` moves an earlier run (`stamp`: its time, plus -N if taken)."""
        return self.root / f"{PREVIOUS_PREFIX}{stamp}"


def outcome_record(folder: Path | str, job_id: str, task: int = 0) -> Path:
    """A task's outcome record in a submitit folder (`folder` may be a job's own folder, which
    submitit hands each task, not only a run's `submitit/`)."""
    return Path(folder) / OUTCOME.format(job=job_id, task=task)


def restart_counter(folder: Path | str, job_id: str) -> Path:
    """The file counting a local-executor job's requeues, in its submitit folder."""
    return Path(folder) / RESTARTS.format(job=job_id)
