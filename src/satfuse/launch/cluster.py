"""Cluster profiles and the submitit executor built from them.

Why profiles: partition, account, QoS, constraint, memory and CPUs differ per site and per
user but never per experiment; they live in `hpc/clusters/NAME.yaml` (strictly loaded: a typo
such as `partiton:` fails before anything is queued, naming the key), and command-line flags
override them for one submission. `executor: local` (or `--cluster local`) runs the very same
task through submitit's local executor on a laptop.

Everything that can be checked before queueing is checked here: the partition exists
(`sinfo -h -p P`), and `sbatch --test-only` accepts the exact script submitit would write
(it catches bad accounts, QoS, node counts and memory), so a bad submission costs a second,
not a day in the queue.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from satfuse.config import ConfigError, load_config
from satfuse.distributed.launcher_env import PREEMPT_SIGNAL_VAR
from satfuse.exit_codes import STOP_SIGNALS
from satfuse.launch.outcomes import setup_guard
from satfuse.resources import ConfigNotFound, resolve_config
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

LOCAL_NAME = "local"
# the requeue signals a profile may choose: the trainer saves on each (TERM is scancel's)
SIGNALS = tuple(s for s in STOP_SIGNALS if s != "TERM")
# sbatch flags the profile's own `signal`/`requeue` fields set (and validate_profile checks)
OWN_FLAGS = ("signal", "requeue", "no-requeue")


@dataclass
class ClusterProfile:
    """Site defaults for `satfuse submit`; every field can be overridden by a CLI flag."""

    executor: Literal["slurm", "local"] = "slurm"  # slurm (sbatch via submitit) or submitit's local executor on this machine
    partition: str = ""  # empty: the cluster's default partition
    account: str = ""  # SLURM account charged (empty: the user's default)
    qos: str = ""  # SLURM quality of service (empty: the default)
    constraint: str = ""  # e.g. "a100|h100"
    exclude: str = ""  # nodes to avoid
    nodes: int = 1  # nodes per job
    gpus_per_node: int = 0  # > 0: one task per GPU
    tasks_per_node: int = 1  # tasks (CPU workers) per node when gpus_per_node == 0
    cpus_per_task: int = 1  # CPU cores per task (loader workers run on these)
    mem_gb: float = 0.0  # per node; 0: the partition's default
    time: str = "04:00:00"  # SLURM syntax: MM, HH:MM:SS, D-HH[:MM[:SS]]
    signal: str = "USR2"  # sent `signal_delay_s` before the time limit (not USR1: NCCL)
    signal_delay_s: int = 120  # seconds before the time limit the signal comes (time to checkpoint)
    requeue: bool = True  # true: --requeue, the task requeues itself after saving on `signal`; false: --no-requeue, it saves and stops
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load ...)
    env: dict[str, str] = field(default_factory=dict)  # exported in the job (e.g. SATFUSE_IFNAME)
    python: str = ""  # python command in the job; default: this interpreter
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other #SBATCH flag: {mail-type: END}

    @property
    def tasks(self) -> int:
        """Tasks per node: one per GPU, else the configured number of CPU workers."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def resolve_profile_path(name: str) -> Path | None:
    """A path, a project copy `./hpc/clusters/NAME.yaml` or a packaged profile (see
    `satfuse.resources`); None for the built-in `local` when no file of that name exists."""

    try:
        return resolve_config(name, "clusters")
    except ConfigNotFound:
        if name == LOCAL_NAME:
            return None
        raise


def load_profile(name: str, flags: dict[str, Any] | None = None) -> tuple[ClusterProfile, str]:
    """Load a profile strictly, then apply CLI flags (None = not given). Returns (profile, label)."""
    path = resolve_profile_path(name)
    profile = load_config(ClusterProfile, path) if path else ClusterProfile(executor="local")
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    if given:
        profile = dataclasses.replace(profile, **given)
    validate_profile(profile, str(path or name))
    return profile, str(path or name)


def validate_profile(p: ClusterProfile, where: str) -> None:
    """Values SLURM would reject only after queueing, or that would break the requeue path."""
    if p.nodes < 1 or p.tasks < 1 or p.cpus_per_task < 1:
        raise ConfigError(f"{where}: nodes, tasks per node and cpus_per_task must be >= 1")
    if p.signal.upper().removeprefix("SIG") == "TERM":
        raise ConfigError(
            f"{where}: signal=TERM cannot be told apart from scancel (TERM means stop for good, the job is "
            "not requeued); use signal: USR2"
        )
    if p.signal.upper().removeprefix("SIG") not in SIGNALS:
        raise ConfigError(
            f"{where}: signal={p.signal!r} is not one the trainer saves on ({', '.join(SIGNALS)}): on it "
            "the ranks would die without a checkpoint; use signal: USR2"
        )
    own = [k for k in p.sbatch if str(k).replace("_", "-") in OWN_FLAGS]
    if own:
        raise ConfigError(
            f"{where}: sbatch: {own[0]} would bypass the profile's `signal`/`requeue` fields and their "
            "checks; set those fields instead"
        )
    if p.signal_delay_s < 0:
        raise ConfigError(f"{where}: signal_delay_s must be >= 0")
    minutes = time_to_minutes(p.time, where)
    if p.executor == "slurm" and p.signal_delay_s >= minutes * 60:
        raise ConfigError(
            f"{where}: signal_delay_s={p.signal_delay_s} is not shorter than time={p.time}: "
            "the job would be signalled at start; lower signal_delay_s or raise time"
        )


def time_to_minutes(text: str, where: str = "cluster profile") -> int:
    """SLURM time syntax to whole minutes (rounded up, at least 1)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise ConfigError(f"{where}: time={text!r} is not SLURM time (MM, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, s = (nums + [0, 0])[:3]
        secs = int(days) * 86400 + h * 3600 + mi * 60 + s
    elif len(nums) == 1:  # MM
        secs = nums[0] * 60
    elif len(nums) == 2:  # MM:SS
        secs = nums[0] * 60 + nums[1]
    else:  # HH:MM:SS
        secs = nums[0] * 3600 + nums[1] * 60 + nums[2]
    return max(1, -(-secs // 60))


# --------------------------------------------------------------------------------------------
# submitit parameters
# --------------------------------------------------------------------------------------------


def signal_name(p: ClusterProfile) -> str:
    return p.signal.upper().removeprefix("SIG")


def setup_lines(p: ClusterProfile, folder: Path | None = None) -> list[str]:
    """Shell lines run before the tasks start: the profile's own, then its env exports.

    Each profile line fails the job at once when it fails, saying which line in the job's
    log and (under SLURM) in the outcome record in `folder` (`outcomes.setup_guard`).
    SUBMITIT_PREEMPT_SIGNAL makes submitit's own handler (active until the trainer installs
    its handlers) listen to the same signal the job is sent.
    """
    lines = setup_guard(list(p.setup), folder)
    env = {PREEMPT_SIGNAL_VAR: signal_name(p), **p.env}
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
    return lines


def slurm_parameters(p: ClusterProfile, name: str, extra: dict[str, Any] | None = None,
                     sbatch: dict[str, Any] | None = None, folder: Path | None = None) -> dict[str, Any]:
    """Native `submitit.slurm` parameters (the arguments of `_make_sbatch_string`)."""
    params: dict[str, Any] = {
        "job_name": name,
        "time": time_to_minutes(p.time),
        "nodes": p.nodes,
        "ntasks_per_node": p.tasks,
        "cpus_per_task": p.cpus_per_task,
        "signal_delay_s": p.signal_delay_s,
        "setup": setup_lines(p, folder),
    }
    if p.gpus_per_node > 0:
        params["gpus_per_node"] = p.gpus_per_node
    if p.mem_gb > 0:
        params["mem"] = _mem(p.mem_gb)
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(p, key):
            params[key] = getattr(p, key)
    additional: dict[str, Any] = {"signal": f"{signal_name(p)}@{p.signal_delay_s}"}
    # explicit both ways: SLURM's JobRequeue=1 default would requeue a job given neither flag
    additional["requeue" if p.requeue else "no-requeue"] = True
    additional.update(p.sbatch)
    additional.update(sbatch or {})
    params["additional_parameters"] = additional
    params.update(extra or {})
    return params


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def local_parameters(p: ClusterProfile, name: str) -> dict[str, Any]:
    """`submitit.local` parameters: same tasks and time; nodes are always 1 locally."""
    if p.nodes != 1:
        raise SatfuseError(f"the local executor runs one node; got nodes={p.nodes}: use --nodes 1 or a SLURM profile")
    params: dict[str, Any] = {
        "timeout_min": time_to_minutes(p.time),
        "tasks_per_node": p.tasks,
        "signal_delay_s": p.signal_delay_s,
        "setup": setup_lines(p),
    }
    if p.gpus_per_node > 0:
        params["gpus_per_node"] = p.gpus_per_node
    return params


def python_command(p: ClusterProfile) -> str:
    return p.python or shlex.quote(sys.executable)


def submitit_command(p: ClusterProfile, folder: Path) -> str:
    """The command submitit runs in each task (what `SlurmExecutor` writes after srun)."""
    return " ".join([python_command(p), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(p: ClusterProfile, folder: Path, name: str, extra: dict[str, Any] | None = None,
                  sbatch: dict[str, Any] | None = None) -> str:
    """The sbatch script submitit writes for this profile (for --dry-run and --test-only)."""
    from submitit.slurm.slurm import _make_sbatch_string  # lazy: --help stays fast (submitit)

    params = slurm_parameters(p, name, extra, sbatch, folder)
    try:
        return _make_sbatch_string(command=submitit_command(p, folder), folder=folder, **params)
    except ValueError as exc:
        raise SatfuseError(f"submitit rejected the job parameters: {exc}") from exc


def make_executor(p: ClusterProfile, folder: Path, name: str, max_requeues: int,
                  extra: dict[str, Any] | None = None, sbatch: dict[str, Any] | None = None) -> Any:
    """A submitit executor for the profile (`AutoExecutor` for SLURM, `LocalExecutor`), parameters set."""
    import submitit  # lazy: --help stays fast (submitit)

    folder.mkdir(parents=True, exist_ok=True)
    if p.executor == LOCAL_NAME:
        # LocalExecutor itself: AutoExecutor hides its signal_delay_s
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues, python=python_command(p))
        ex.update_parameters(**local_parameters(p, name))
        return ex
    require_slurm()
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues,
                               slurm_python=python_command(p))
    ex.update_parameters(**{f"slurm_{k}": v for k, v in slurm_parameters(p, name, extra, sbatch, folder).items()})
    return ex


# --------------------------------------------------------------------------------------------
# Checks against the real cluster (before anything is queued)
# --------------------------------------------------------------------------------------------


def require_slurm() -> None:
    for tool in ("sbatch", "sinfo", "srun"):
        if shutil.which(tool) is None:
            raise SatfuseError(
                f"{tool} not found: not on a SLURM login node; use --cluster local, or start the "
                "test cluster with slurm/local-cluster/start.sh and export SLURM_CONF"
            )


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SatfuseError(f"{' '.join(cmd)} failed ({exc}); is slurmctld reachable (SLURM_CONF)?") from exc


def check_partition(p: ClusterProfile, where: str) -> None:
    """Fail with a clear message when the partition does not exist on this cluster."""
    if p.executor != "slurm" or not p.partition:
        return
    require_slurm()
    res = _run(["sinfo", "-h", "-o", "%R"])
    if res.returncode != 0:
        raise SatfuseError(f"sinfo failed: {res.stderr.strip()}; is slurmctld reachable (SLURM_CONF)?")
    known = sorted(set(res.stdout.split()))
    if p.partition not in known:
        raise SatfuseError(
            f"{where}: partition {p.partition!r} does not exist on this cluster; "
            f"use --partition with one of {known} (see `sinfo`)"
        )


def sbatch_test_only(script: str, where: str) -> None:
    """`sbatch --test-only` the exact script: SLURM's own verdict, nothing queued."""
    require_slurm()
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as fh:
        fh.write(script)
        path = fh.name
    try:
        res = _run(["sbatch", "--test-only", path])
    finally:
        Path(path).unlink(missing_ok=True)
    if res.returncode != 0:
        msg = " ".join(res.stderr.strip().split()) or f"exit status {res.returncode}"
        raise SatfuseError(f"{where}: SLURM would reject this job ({msg}); fix the profile or the flags")
    log.debug("sbatch --test-only: %s", res.stderr.strip())


def preflight(p: ClusterProfile, where: str, script: str) -> None:
    """All checks that must pass before a job is queued."""
    if p.executor != "slurm":
        return
    check_partition(p, where)
    sbatch_test_only(script, where)
