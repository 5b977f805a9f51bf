"""Which launcher started this process and where it sits in the job; torch-free.

One short function, `world_info_from_env`, checks the launchers in order (the shape of
open_clip's `world_info_from_env` and DINO's `_setup_gpu_args`):

1. torchrun (`RANK` + `WORLD_SIZE`): wins, because `srun torchrun ...` sets SLURM variables
   too and torchrun's numbering is the one the processes really have;
2. submitit's local executor (`SUBMITIT_LOCAL_GLOBALID`): one node, loopback master; before
   SLURM because a local job started inside an allocation inherits its SLURM variables;
3. a SLURM step (`SLURM_PROCID` + `SLURM_STEP_ID`; submitit on SLURM is one too): the master
   is the first host of the step's node list, never `localhost` on several nodes;
4. otherwise one process.

The rendezvous port, when the launcher does not give one (`MASTER_PORT`), is
`port_from_job_id(job id, restart)`: the job id so that two jobs sharing a node do not fight
over one port, and the requeue count so that a requeued job (same job id) does not meet the
sockets of its previous attempt (a rank of the old attempt still dying, a port in
TIME_WAIT). Every task of one attempt sees the same job id and the same restart count
(`SLURM_RESTART_COUNT`; the local executor's count is passed in), so all ranks agree
without talking. This module is also where SLURM node lists are expanded.

It is the one module that reads (or sets, for child processes) the launchers' variables:
`SLURM_*`, `SUBMITIT_*`, torchrun's `RANK`/`LOCAL_RANK`/`WORLD_SIZE`/`MASTER_*`/
`TORCHELASTIC_*`, and satfuse's own `SATFUSE_LAUNCHER_PID`; everyone else calls the named
functions at the end of this file (`tests/distributed/test_launcher_vars.py` scans src/ for
strays). Inside a submitit job, job id, array ids and ranks come from
`submitit.JobEnvironment` (`submitit_job`); outside one (a plain sbatch template, torchrun)
from the variables themselves.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any

from satfuse.distributed.ports import port_from_job_id
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "::1"}


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits in the job. `source` says which launcher the values came from."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # torchrun | slurm | submitit_local | single

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Node lists
# --------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: `a[1-2,4],b` -> [`a[1-2,4]`, `b`]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SatfuseError(f"bad SLURM node list {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise SatfuseError(f"bad SLURM node list {text!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(spec: str, whole: str) -> list[str]:
    """`01-03,7` -> [`01`, `02`, `03`, `7`]; zero padding follows the lower bound's width."""
    out: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise SatfuseError(f"bad SLURM node list {whole!r}: range {item!r} is not N or N-M")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise SatfuseError(f"bad SLURM node list {whole!r}: range {item!r} runs backwards")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list without `scontrol`: `n[1-2,5],gpu[01-02]-ib` -> hosts in order.

    The fallback for hosts without the SLURM client tools (a submitit job on a login node
    image, a container); `scontrol show hostnames` is preferred when present because sites
    can configure exotic names.
    """
    hosts: list[str] = []
    for group in _split_top_level(nodelist):
        pieces = re.split(r"(\[[^\]]*\])", group)
        choices = [
            _expand_range_list(p[1:-1], nodelist) if p.startswith("[") else [p] for p in pieces if p
        ]
        hosts.extend("".join(combo) for combo in product(*choices))
    if not hosts:
        raise SatfuseError(f"empty SLURM node list {nodelist!r}")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Hosts of a SLURM node list, via `scontrol show hostnames` when available."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            res = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=15,
                check=False,
            )
            hosts = res.stdout.split()
            if res.returncode == 0 and hosts:
                return hosts
            log.debug(
                "scontrol show hostnames failed (%s); parsing %r", res.stderr.strip(), nodelist
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("scontrol unusable (%s); parsing %r", exc, nodelist)
    return parse_nodelist(nodelist)


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed task counts: `2(x3),1` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise SatfuseError(f"bad SLURM tasks-per-node value {spec!r}: expected e.g. '2(x3),1'")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise SatfuseError(f"environment variable {key} is missing; the launcher must set it")
        return default
    try:
        return int(raw)
    except ValueError:
        raise SatfuseError(f"environment variable {key}={raw!r} is not an integer") from None


def _is_loopback(addr: str) -> bool:
    return addr.lower() in _LOOPBACK_NAMES or addr.startswith("127.")


def _from_torchrun(env: Mapping[str, str]) -> WorldInfo:
    world = _int(env, "WORLD_SIZE")
    local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    local_rank = _int(env, "LOCAL_RANK", 0)
    nodes = _int(env, "GROUP_WORLD_SIZE", max(1, world // max(local_world, 1)))
    addr = env.get("MASTER_ADDR") or ""
    if world > 1 and not addr:
        raise SatfuseError(
            "WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun or set it"
        )
    return WorldInfo(
        rank=_int(env, "RANK"),
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=_int(env, "GROUP_RANK", _int(env, "NODE_RANK", 0)),
        master_addr=addr or "127.0.0.1",
        master_port=_int(env, "MASTER_PORT", 29500),
        num_nodes=nodes,
        source="torchrun",
    )


def _slurm_nodelist(env: Mapping[str, str]) -> str:
    """The step's node list when inside `srun` (a step may use fewer nodes than the job)."""
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(key):
            return env[key]
    raise SatfuseError("SLURM_PROCID is set but no SLURM_JOB_NODELIST: not a usable SLURM step")


def _slurm_local_world(env: Mapping[str, str], node_rank: int, world: int) -> int:
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int(env, "SLURM_NTASKS_PER_NODE")
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            counts = parse_tasks_per_node(env[key])
            return counts[min(node_rank, len(counts) - 1)]
    return world


def _from_slurm(env: Mapping[str, str], restart: int) -> WorldInfo:
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    rank = _int(env, "SLURM_PROCID")
    node_rank = _int(env, "SLURM_NODEID", 0)
    local_rank = _int(env, "SLURM_LOCALID", 0)
    hosts = expand_nodelist(_slurm_nodelist(env))
    nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_JOB_NUM_NODES", len(hosts)))
    addr = env.get("MASTER_ADDR") or hosts[0]
    if nodes > 1 and _is_loopback(addr):
        raise SatfuseError(
            f"MASTER_ADDR={addr} is a loopback address but the job spans {nodes} nodes "
            f"({', '.join(hosts)}): unset MASTER_ADDR (satfuse uses the first host, {hosts[0]})"
        )
    port = _int(env, "MASTER_PORT", port_from_job_id(env.get("SLURM_JOB_ID", "0"), restart))
    return WorldInfo(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=_slurm_local_world(env, node_rank, world),
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
        num_nodes=nodes,
        source="slurm",
    )


def _from_submitit_local(env: Mapping[str, str], restart: int) -> WorldInfo:
    """submitit's local executor: one node, its tasks numbered by submitit."""
    world = _int(env, "SUBMITIT_LOCAL_NTASKS", 1)
    return WorldInfo(
        rank=_int(env, "SUBMITIT_LOCAL_GLOBALID"),
        local_rank=_int(env, "SUBMITIT_LOCAL_LOCALID", 0),
        world_size=world,
        local_world_size=world,
        master_addr="127.0.0.1",
        master_port=_int(env, "MASTER_PORT", port_from_job_id(env.get("SUBMITIT_LOCAL_JOB_ID", "0"), restart)),
        source="submitit_local",
    )


def world_info_from_env(environ: Mapping[str, str] | None = None, restart: int | None = None) -> WorldInfo:
    """This process's place in the job, launchers checked in order (see the module docstring).

    `restart`: requeues so far, for the rendezvous port (default `SLURM_RESTART_COUNT`).
    """
    env = os.environ if environ is None else environ
    if restart is None:
        restart = _int(env, "SLURM_RESTART_COUNT", 0)
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        return _from_torchrun(env)
    if env.get("SUBMITIT_LOCAL_GLOBALID") is not None:
        return _from_submitit_local(env, restart)
    if env.get("SLURM_PROCID") is not None and env.get("SLURM_STEP_ID") is not None:
        return _from_slurm(env, restart)
    return WorldInfo()


def torchrun_vars(info: WorldInfo) -> dict[str, str]:
    """The layout as torch.distributed `env://` variables (what torchrun would set): the
    submitit task exports them before the trainer starts, and DeepSpeed reads them."""
    return {
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank),
        "LOCAL_WORLD_SIZE": str(info.local_world_size),
        "NODE_RANK": str(info.node_rank),
        "GROUP_WORLD_SIZE": str(info.num_nodes),
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
    }


def export_torchrun_vars(info: WorldInfo) -> None:
    """Publish `info` into this process's environment as torchrun would (`torchrun_vars`):
    torch's env:// rendezvous, DeepSpeed and later `world_info_from_env` calls read them."""
    os.environ.update(torchrun_vars(info))


def export_rendezvous(addr: str, port: int) -> None:
    """Set only MASTER_ADDR/MASTER_PORT (for a process group whose ranks are passed explicitly)."""
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))


# --------------------------------------------------------------------------------------------
# Named readers: what the rest of satfuse asks about its launcher
# --------------------------------------------------------------------------------------------

# Set by `satfuse pretrain --nproc-per-node N` for the torchrun ranks it starts: its own pid.
LAUNCHER_PID_VAR = "SATFUSE_LAUNCHER_PID"
# Read by submitit's handler in the job: which signal means "checkpoint and requeue".
PREEMPT_SIGNAL_VAR = "SUBMITIT_PREEMPT_SIGNAL"
# Prefixes/names of the variables that place a process in a job: dropped from the environment
# of a job submitted from inside another one (they would describe the submitter's job).
LAUNCHER_VAR_PREFIXES = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_")


def submitit_job() -> Any | None:
    """submitit's `JobEnvironment` when this process is a task of a submitit job, else None.

    Why prefer it inside a job: submitit knows its executor's variables (SLURM or local) and
    builds the array job id itself, so satfuse does not hand-read `SLURM_*` there."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit  # lazy: only inside a submitit job; `satfuse --help` stays fast

    return submitit.JobEnvironment()


def _slurm_job_env() -> Any | None:
    """`submitit_job()` when it is a SLURM job (the local executor's ids are not SLURM's)."""
    job = submitit_job()
    return job if job is not None and job.cluster == "slurm" else None


def process_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher numbered it: torchrun's RANK first, then
    the submitit task's rank, then a SLURM step's SLURM_PROCID; 0 for a single process."""
    env = os.environ if environ is None else environ
    if env.get("RANK") is not None:
        return _int(env, "RANK")
    job = submitit_job() if environ is None else None
    if job is not None:
        return int(job.global_rank)
    return _int(env, "SLURM_PROCID", 0)


def started_by_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher already placed this process in a job (torchrun's RANK, or a SLURM
    task): `satfuse pretrain --nproc-per-node N` then trains here instead of starting ranks."""
    env = os.environ if environ is None else environ
    return "RANK" in env or "SLURM_PROCID" in env


def torchrun_multi_rank(environ: Mapping[str, str] | None = None) -> bool:
    """Whether torch-style variables say this is one of several ranks (RANK set, WORLD_SIZE > 1)."""
    env = os.environ if environ is None else environ
    return "RANK" in env and _int(env, "WORLD_SIZE", 1) > 1


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str:
    """The job's id as squeue knows it (`ARRAYJOB_TASK` for an array task), or '' outside SLURM."""
    job = _slurm_job_env() if environ is None else None
    if job is not None:
        return str(job.job_id)
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def slurm_restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How often SLURM requeued this job (`SLURM_RESTART_COUNT`; 0 on the first attempt)."""
    env = os.environ if environ is None else environ
    return _int(env, "SLURM_RESTART_COUNT", 0)


def slurm_array_defaults(env: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """(index, count) of a SLURM job array, or (None, None) outside one.

    The index is TASK_ID - TASK_MIN (arrays may start at 1); the count falls back to
    MAX - MIN + 1 where SLURM_ARRAY_TASK_COUNT is absent (older SLURM). Inside a submitit
    SLURM job the task id is submitit's `array_task_id`.
    """
    job = _slurm_job_env() if env is None else None
    env = dict(os.environ) if env is None else env
    task_id = job.array_task_id if job is not None else env.get("SLURM_ARRAY_TASK_ID")
    if task_id is None:
        return None, None
    task, low = int(task_id), int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    elif "SLURM_ARRAY_TASK_MAX" in env:
        count = int(env["SLURM_ARRAY_TASK_MAX"]) - low + 1
    else:
        raise SatfuseError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor _MAX; pass --shard-index and --num-shards")
    return task - low, count


def torchelastic_error_file() -> str | None:
    """Where torchrun's agent reads a failed rank's error (`TORCHELASTIC_ERROR_FILE`), or None."""
    return os.environ.get("TORCHELASTIC_ERROR_FILE") or None


def launcher_pid() -> int | None:
    """The pid of the `satfuse pretrain --nproc-per-node N` that started this rank, or None."""
    raw = os.environ.get(LAUNCHER_PID_VAR)
    return int(raw) if raw else None


def local_ranks_env(nproc: int) -> dict[str, str]:
    """The environment for torchrun's ranks started by this process: this one's, plus the
    launcher's pid (`launcher_pid` in each rank) and a fair OMP_NUM_THREADS default."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env[LAUNCHER_PID_VAR] = str(os.getpid())
    return env


def default_local_rank() -> None:
    """Set LOCAL_RANK=0 unless a launcher set it (DeepSpeed asserts it is set, even for one rank)."""
    os.environ.setdefault("LOCAL_RANK", "0")


def without_launcher_vars(environ: Mapping[str, str], slurm_conf: str | None = None) -> dict[str, str]:
    """`environ` minus every variable that places a process in a job (`LAUNCHER_VAR_PREFIXES`),
    pointed at another cluster's `slurm.conf` when given: for a job submitted from a process
    that is itself inside a job or a rank."""
    env = {k: v for k, v in environ.items() if not k.startswith(LAUNCHER_VAR_PREFIXES)}
    if slurm_conf is not None:
        env["SLURM_CONF"] = slurm_conf
    return env
