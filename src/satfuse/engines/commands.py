"""`satfuse pretrain`: run pretraining in this process, or start N local ranks via torchrun."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from satfuse.checkpoint.resolve import parse_resume
from satfuse.config import ConfigError
from satfuse.distributed.launcher_env import (
    launcher_pid,
    local_ranks_env,
    started_by_launcher,
    torchrun_multi_rank,
)
from satfuse.engines.rundir import pid_alive, process_start_time
from satfuse.utils import SatfuseError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining (Dual-SimCLR, SimCLR, MMA) with DDP or DeepSpeed",
        description="Pretrain from a YAML config (hpc/pretrain/*.yaml) with key=value overrides, "
        "e.g. `satfuse pretrain --config hpc/pretrain/dual_simclr.yaml train.steps=100 resume=auto`.",
    )
    p.add_argument("--config", default=None, help="YAML path or packaged name, e.g. tiny (see `satfuse configs`)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="start this many local ranks with torchrun (ignored inside torchrun/SLURM tasks)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="resume from a checkpoint whose files are not plain data (they may run code "
                        "when loaded); same as checkpoint.trust_checkpoint=true")
    p.add_argument("--force-new-run", action="store_true",
                   help="start afresh (checkpoint.resume=none) in a used run_dir: move the earlier "
                   "run to run_dir/previous-<time>/ instead of refusing (not in a job that may be "
                   "requeued: each requeue would start afresh again)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 resume=auto")
    p.set_defaults(func=cmd_pretrain)


def normalise_overrides(items: list[str]) -> list[str]:
    """`resume=auto` is the documented shorthand for `checkpoint.resume=auto`."""
    return [f"checkpoint.{i}" if i.startswith("resume=") else i for i in items]


def cmd_pretrain(args: argparse.Namespace) -> int:
    overrides = normalise_overrides(args.overrides)
    if getattr(args, "trust_checkpoint", False):
        overrides.append("checkpoint.trust_checkpoint=true")
    if getattr(args, "force_new_run", False):  # a fresh start, the earlier run moved aside
        other = [o for o in overrides if o.startswith("checkpoint.resume=")
                 and parse_resume(o.split("=", 1)[1]).kind != "none"]
        if other:
            raise SatfuseError(f"--force-new-run starts afresh, but {other[-1]} asks to resume; pass one of them")
        overrides += ["checkpoint.resume=none", "checkpoint.force_new_run=true"]
    if args.nproc_per_node > 1 and not started_by_launcher():
        from satfuse.engines.pretrain import precheck  # lazy: --help stays torch-free

        precheck(args.config, overrides)  # config/shard errors: one line here, not one per rank
        return launch_local(args.config, overrides, args.nproc_per_node)
    if (launcher := launcher_pid()) is not None:
        die_with_launcher(launcher)
    from satfuse.distributed.env import exit_cleanly  # lazy: --help stays torch-free
    from satfuse.engines.pretrain import run_pretrain  # lazy: --help stays torch-free

    try:
        code = run_pretrain(args.config, overrides)
    except Exception as exc:  # the launcher reports the first rank's line and status
        from satfuse.engines.torchrun import record_rank_error  # lazy: --help stays torch-free

        if isinstance(exc, (SatfuseError, ConfigError)):
            record_rank_error(str(exc))
        raise
    if torchrun_multi_rank():
        exit_cleanly(code)  # gloo threads can abort a normal interpreter exit
    return code


def launch_local(config: str | None, overrides: list[str], nproc: int) -> int:
    """Re-run this command under torchrun with `nproc` ranks on this machine.

    Returns the ranks' status (75: saved after a stop signal; 2: bad input), not torchrun's 1.
    The caller ran `engines.pretrain.precheck` first, so a bad config fails once, with one line.
    """
    cmd = [sys.executable, "-m", "satfuse.engines.torchrun", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "satfuse.cli", "pretrain"]
    if config:
        cmd += ["--config", config]
    return subprocess.call(cmd + overrides, env=local_ranks_env(nproc), preexec_fn=_term_on_parent_death)


PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: the rank-side watchdog still covers it
        return False


def _term_on_parent_death() -> None:
    """In torchrun's agent (between fork and exec): SIGTERM when the launcher dies, so the
    agent stops its ranks the way it does on Ctrl-C (they save and exit)."""
    _set_pdeathsig(signal.SIGTERM)


def die_with_launcher(launcher: int, poll_s: float = 0.5) -> None:
    """In a rank started by `launch_local`: die with the launcher, however it died.

    torchrun's agent sits between the launcher and the ranks and starts them in their own
    sessions, so a SIGKILL of `satfuse pretrain --nproc-per-node N` used to leave the ranks
    training and checkpointing on, invisibly. Two guards: SIGKILL when our parent (the agent)
    dies, and a watchdog thread that SIGKILLs this rank once the launcher's pid is gone (or
    is another process): checkpoints are atomic, so a kill at any point loses only the steps
    since the last one, never the run_dir."""

    parent = os.getppid()
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the agent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
    stamp = process_start_time(launcher)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if not pid_alive(launcher) or process_start_time(launcher) != stamp:
                logging.getLogger(__name__).error(
                    "the launcher (pid %d) is gone: stopping this rank", launcher)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="satfuse-launcher-watchdog", daemon=True).start()
