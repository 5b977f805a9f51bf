"""Process-group set-up that behaves the same on a laptop, under torchrun and on SLURM.

Why this module exists: a framework that has only run on one node usually breaks on the
first real allocation: `MASTER_ADDR=localhost` on two nodes, ranks computed from the local
GPU count, a NIC that gloo/NCCL pick wrongly, or a dead peer that hangs every other rank
forever. Here every rank, local rank, world size and the master address come from the
launcher (`satfuse.distributed.launcher_env`: torchrun, SLURM/submitit; the master is the
first host of the step's node list), never from `localhost` on several nodes; the interface is
configurable (`SATFUSE_IFNAME`) and checked *before* connecting; and the rendezvous has a
timeout that turns a missing peer into a one-line `SatfuseError` naming the rank and host.

Entry points end with `exit_cleanly(code)`: gloo worker threads that are still alive at
interpreter shutdown abort the process (SIGABRT) in about 1 run in 3, and destroying a
multi-rank gloo group can deadlock (see `teardown`), so we flush and `os._exit`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from satfuse.distributed.launcher_env import WorldInfo, export_torchrun_vars, world_info_from_env
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

IFNAME_VAR = "SATFUSE_IFNAME"

_STATE: dict[str, DistEnv] = {}


@dataclass(frozen=True)
class DistEnv(WorldInfo):
    """`WorldInfo` (where this process sits, from the launcher) plus how it communicates."""

    backend: str = "gloo"
    device: str = "cpu"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_backend(backend: str = "auto") -> str:
    """`auto` -> nccl when CUDA is usable, else gloo. Explicit names pass through."""
    if backend != "auto":
        if backend not in ("gloo", "nccl", "mpi", "ucc"):
            raise SatfuseError(f"unknown backend {backend!r}: use auto, gloo or nccl")
        return backend
    try:
        import torch  # lazy: the launcher side stays torch-free

        return "nccl" if torch.cuda.is_available() else "gloo"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "gloo"


def _device(backend: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if backend == "nccl" else "cpu"


def detect_env(environ: Mapping[str, str] | None = None, backend: str = "auto") -> DistEnv:
    """Rank layout of this process (`launcher_env.world_info_from_env`: torchrun, SLURM,
    submitit local, else one process) plus the backend and this rank's device."""
    be = resolve_backend(backend)
    info = world_info_from_env(environ)
    return DistEnv(**info.as_dict(), backend=be, device=_device(be, info.local_rank))


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
    """Publish the layout as torchrun-style variables: torch's env://, DeepSpeed and others
    read them. The node variables go too (NODE_RANK, GROUP_WORLD_SIZE): once RANK/WORLD_SIZE
    are set, `world_info_from_env` reads the torchrun style first, and without them every rank
    of a SLURM job would read itself as node 0."""
    export_torchrun_vars(env)


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
    import torch  # lazy: the launcher side stays torch-free
    import torch.distributed as dist  # lazy: the launcher side stays torch-free

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


def current_env() -> DistEnv | None:
    """The layout `init_distributed` joined with (None before it ran): the resolved layout
    itself, without re-reading the environment."""
    return _STATE.get("env")


def teardown() -> None:
    """Forget this process's rendezvous. torch's process group is destroyed only when this
    process is the whole world (it may train again in-process: tests, notebooks); with several
    ranks it is left to the process exit, and every multi-rank entry point ends in
    `exit_cleanly` (`os._exit`), so the OS frees its sockets and threads.

    Why not destroy it with several ranks: the last reference to a gloo group runs
    `~ProcessGroupGloo`, which joins the group's worker threads while holding the GIL; a worker
    still freeing its last finished collective needs the GIL to drop a Python object kept in
    that op's thread-local state. Both wait forever: gdb on a rank that never exited showed the
    main thread in `ProcessGroupGloo::~ProcessGroupGloo -> std::thread::join` and a
    `pt_gloo_runloop` thread in `AsyncWork::~AsyncWork -> take_gil`. A race: it hung a 3-rank
    resume test in CI, and 2 of the first 8 runs of that test's ranks in a loop on 2 cores
    (0 of 60 once the group was left to the exit); in a job it would hold the nodes until the
    time limit.
    """
    _STATE.pop("env", None)
    try:
        import torch.distributed as dist  # lazy: the launcher side stays torch-free

        from satfuse.distributed.collectives import (  # lazy: the launcher side stays torch-free
            dist_ready,
            forget_groups,
            world,
        )

        forget_groups()
        if dist_ready() and world() == 1:
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
    from satfuse.distributed.collectives import rank  # lazy: the launcher side stays torch-free
    return SatfuseError(
        f"rank {rank()} on host {socket.gethostname()}: {who} dropped out during {what} "
        f"({reason}); the job stops here - check that node's log and resubmit: it resumes "
        f"from the last complete checkpoint"
    )
