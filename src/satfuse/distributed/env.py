"""Process-group set-up that behaves the same on a laptop, under torchrun and on SLURM.

Why this module exists: a framework that has only run on one node usually breaks on the
first real allocation: `MASTER_ADDR=localhost` on two nodes, ranks computed from the local
GPU count, a NIC that gloo/NCCL pick wrongly, or a dead peer that hangs every other rank
forever. Here every rank, local rank, world size and the master address come from the
launcher (torchrun env vars, or SLURM/submitit: the master is the first host of the step's
node list), never from `localhost` when the job spans several nodes; the interface is
configurable (`SATFUSE_IFNAME`) and checked *before* connecting; and the rendezvous has a
timeout that turns a missing peer into a one-line `SatfuseError` naming the rank and host.

Entry points end with `exit_cleanly(code)`: gloo worker threads that are still alive at
interpreter shutdown abort the process (SIGABRT) in about 1 run in 3, so we destroy the
group, flush and `os._exit`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from itertools import product
from pathlib import Path
from typing import NoReturn

from satfuse.distributed.ports import port_from_job_id
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

IFNAME_VAR = "SATFUSE_IFNAME"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "::1"}

_STATE: dict[str, DistEnv] = {}


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. `source` says which launcher the values came from."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = "gloo"
    device: str = "cpu"
    num_nodes: int = 1
    source: str = "single"  # torchrun | slurm | single

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

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


def resolve_backend(backend: str = "auto") -> str:
    """`auto` -> nccl when CUDA is usable, else gloo. Explicit names pass through."""
    if backend != "auto":
        if backend not in ("gloo", "nccl", "mpi", "ucc"):
            raise SatfuseError(f"unknown backend {backend!r}: use auto, gloo or nccl")
        return backend
    try:
        import torch

        return "nccl" if torch.cuda.is_available() else "gloo"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "gloo"


def _device(backend: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if backend == "nccl" else "cpu"


def _is_loopback(addr: str) -> bool:
    return addr.lower() in _LOOPBACK_NAMES or addr.startswith("127.")


def _from_torchrun(env: Mapping[str, str], backend: str) -> DistEnv:
    world = _int(env, "WORLD_SIZE")
    local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    local_rank = _int(env, "LOCAL_RANK", 0)
    nodes = _int(env, "GROUP_WORLD_SIZE", max(1, world // max(local_world, 1)))
    addr = env.get("MASTER_ADDR") or ""
    if world > 1 and not addr:
        raise SatfuseError(
            "WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun or set it"
        )
    return DistEnv(
        rank=_int(env, "RANK"),
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=_int(env, "GROUP_RANK", _int(env, "NODE_RANK", 0)),
        master_addr=addr or "127.0.0.1",
        master_port=_int(env, "MASTER_PORT", 29500),
        backend=backend,
        device=_device(backend, local_rank),
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


def _from_slurm(env: Mapping[str, str], backend: str) -> DistEnv:
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
    port = _int(env, "MASTER_PORT", port_from_job_id(env.get("SLURM_JOB_ID", "0")))
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=_slurm_local_world(env, node_rank, world),
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
        backend=backend,
        device=_device(backend, local_rank),
        num_nodes=nodes,
        source="slurm",
    )


def detect_env(environ: Mapping[str, str] | None = None, backend: str = "auto") -> DistEnv:
    """Rank layout of this process: torchrun variables first, then SLURM, else one process.

    torchrun wins over SLURM because `srun torchrun ...` (one launcher per node) sets both,
    and there torchrun's numbering is the one the processes really have. Inside SLURM the
    master is the first host of the step's node list and the port is derived from the job
    id, so every rank computes the same values without talking to each other.
    """
    env = os.environ if environ is None else environ
    be = resolve_backend(backend)
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        return _from_torchrun(env, be)
    if env.get("SLURM_PROCID") is not None and env.get("SLURM_STEP_ID") is not None:
        return _from_slurm(env, be)
    return DistEnv(backend=be, device=_device(be, 0) if be == "nccl" else "cpu")


# --------------------------------------------------------------------------------------------
# Network interface
# --------------------------------------------------------------------------------------------


def list_interfaces() -> list[str]:
    """Names of this host's network interfaces (in the current network namespace)."""
    try:
        return sorted(name for _, name in socket.if_nameindex())
    except OSError:
        sys_net = Path("/sys/class/net")
        return sorted(p.name for p in sys_net.iterdir()) if sys_net.is_dir() else []


def configure_interface(ifname: str | None = None) -> str | None:
    """Point gloo and NCCL at `ifname` (or `$SATFUSE_IFNAME`), after checking it exists here.

    Why check first: gloo with a wrong GLOO_SOCKET_IFNAME fails deep inside the rendezvous
    with a C++ error, and NCCL may hang until the timeout; a clear message at start saves a
    queued multi-node job. A comma-separated list is accepted (gloo uses several).
    """
    name = ifname or os.environ.get(IFNAME_VAR) or ""
    if not name:
        return None
    present = list_interfaces()
    missing = [n for n in (s.strip() for s in name.split(",")) if n and n not in present]
    if missing:
        raise SatfuseError(
            f"network interface {', '.join(missing)} (from {'the ifname argument' if ifname else IFNAME_VAR}) "
            f"does not exist on host {socket.gethostname()}; interfaces here: {', '.join(present) or 'none'}"
            f" - set {IFNAME_VAR} to one of them (the one that connects the nodes)"
        )
    os.environ["GLOO_SOCKET_IFNAME"] = name
    os.environ["NCCL_SOCKET_IFNAME"] = name
    log.info("using network interface %s for gloo/NCCL", name)
    return name


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------


def _export(env: DistEnv) -> None:
    """Publish the layout as torchrun-style variables: DeepSpeed and others read them."""
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )


def _rendezvous_error(env: DistEnv, timeout_s: int, exc: BaseException) -> SatfuseError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SatfuseError(
        f"rank {env.rank}/{env.world_size} on host {socket.gethostname()} could not join the "
        f"process group at {env.master_addr}:{env.master_port} within {timeout_s}s ({first}); "
        f"check that every node of the job started and is alive, that {env.master_addr} "
        f"resolves to the master node's address from here, that port {env.master_port} is free, "
        f"and set {IFNAME_VAR} to the interface that connects the nodes"
    )


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a local rank among the `visible` ones.

    torchrun and `srun --gpus-per-node` show every GPU of the node to every rank (index =
    local rank); `srun --gpus-per-task=1` and submitit's per-task binding show each rank
    only its own GPU (CUDA_VISIBLE_DEVICES has one entry: index 0, whatever the local rank).
    """
    if visible < 1:
        raise SatfuseError("the NCCL backend needs a CUDA device but none is visible to this rank; "
                           "check CUDA_VISIBLE_DEVICES and the job's GPU request (--gpus-per-node)")
    return local_rank % visible


def configure_nccl() -> None:
    """A dead or stuck rank fails the job instead of hanging it: with async error handling
    NCCL's watchdog aborts the communicators and ends the process once a collective exceeds
    the process group's timeout (`train.comm_timeout_s`). A value the user set is kept."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ.setdefault("NCCL_ASYNC_ERROR_HANDLING", "1")  # the name before torch 2.2


def init_distributed(
    timeout_s: int = 300, backend: str = "auto", ifname: str | None = None
) -> DistEnv:
    """Detect the layout and join the process group; world size 1 creates no group at all.

    Idempotent: a second call returns the same `DistEnv`. `timeout_s` bounds both the
    rendezvous and every later collective, so a dead peer fails the job instead of hanging.
    """
    if "env" in _STATE:
        return _STATE["env"]
    configure_interface(ifname)
    env = detect_env(backend=backend)
    import torch
    import torch.distributed as dist

    if env.backend == "nccl":
        configure_nccl()
        torch.cuda.set_device(cuda_index(env.local_rank, torch.cuda.device_count()))
    if env.world_size > 1 and not dist.is_initialized():
        _export(env)
        log.info(
            "joining process group: rank %d/%d (local %d, node %d/%d) master %s:%d backend %s",
            env.rank, env.world_size, env.local_rank, env.node_rank, env.num_nodes,
            env.master_addr, env.master_port, env.backend,
        )  # fmt: skip
        try:
            dist.init_process_group(
                backend=env.backend,
                init_method="env://",
                rank=env.rank,
                world_size=env.world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise _rendezvous_error(env, timeout_s, exc) from exc
    _STATE["env"] = env
    return env


def teardown() -> None:
    """Destroy the process group without a barrier (a dead peer must not block the exit)."""
    _STATE.pop("env", None)
    _GROUPS.clear()
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # exiting anyway: say why, do not mask the exit code
        log.warning("destroy_process_group failed: %s", exc)


def exit_cleanly(code: int = 0) -> NoReturn:
    """End an entry point: teardown, flush, `os._exit(code)`.

    Skipping interpreter shutdown avoids gloo's 'terminate called without an active
    exception' SIGABRT (threads alive at exit), which would turn a success into a failure.
    """
    teardown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(int(code))


_PEER_RE = re.compile(r"\[([0-9a-fA-F.:]+)\]:\d+")


def _peer_name(addr: str) -> str:
    try:
        return f"{socket.gethostbyaddr(addr)[0]} ({addr})"
    except OSError:
        return addr


def comm_failure(exc: BaseException, what: str = "a collective") -> SatfuseError:
    """Turn a gloo/NCCL failure into one line naming this rank, its host and the lost peer.

    Why: gloo reports a dead node as `Read error [10.77.0.2]:13447: Connection reset by
    peer ... GLHF!`; the user needs the *node name* and what to do next. Call it in the
    trainer's `except RuntimeError` around the step and raise the result.
    """
    text = str(exc)
    peers = sorted({_peer_name(a) for a in _PEER_RE.findall(text)})
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    reason = re.sub(r"^\[[^\]]*pair\.cc:\d+\]\s*", "", first).split(". This is typically")[0]
    who = f"peer node {', '.join(peers)}" if peers else "a peer rank"
    return SatfuseError(
        f"rank {rank()} on host {socket.gethostname()}: {who} dropped out during {what} "
        f"({reason}); the job stops here - check that node's log and resubmit: it resumes "
        f"from the last complete checkpoint"
    )


# --------------------------------------------------------------------------------------------
# Small helpers (all safe without a process group)
# --------------------------------------------------------------------------------------------


def control_group():
    """The process group for per-step control flags (stop signals): the default group when it
    is gloo, else one gloo group over all ranks, made once. Why: a flag all-reduced through
    NCCL is copied to the GPU and read back with `.item()`, which waits for every queued
    kernel - a host synchronisation at every step; through gloo it stays on the CPU.
    Collective on first use (every rank calls it at the same point); None without a group."""
    if not _dist_ready():
        return None
    import torch.distributed as dist

    if dist.get_backend() != "nccl":
        return None
    if "control" not in _GROUPS:
        _GROUPS["control"] = dist.new_group(backend="gloo")
    return _GROUPS["control"]


_GROUPS: dict[str, object] = {}


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def current_env() -> DistEnv:
    """The `DistEnv` of `init_distributed`, or a freshly detected one before it ran."""
    return _STATE.get("env") or detect_env()


def rank() -> int:
    if _dist_ready():
        import torch.distributed as dist

        return dist.get_rank()
    return 0


def world() -> int:
    if _dist_ready():
        import torch.distributed as dist

        return dist.get_world_size()
    return 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _dist_ready():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_max_bool(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. 'stop: preempted' or 'NaN seen')."""
    if not _dist_ready():
        return bool(flag)
    import torch
    import torch.distributed as dist

    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    )
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
