"""`satfuse pretrain`: run pretraining in this process, or start N local ranks via torchrun."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


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
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 resume=auto")
    p.set_defaults(func=cmd_pretrain)


def normalise_overrides(items: list[str]) -> list[str]:
    """`resume=auto` is the documented shorthand for `checkpoint.resume=auto`."""
    return [f"checkpoint.{i}" if i.startswith("resume=") else i for i in items]


def cmd_pretrain(args: argparse.Namespace) -> int:
    overrides = normalise_overrides(args.overrides)
    if getattr(args, "trust_checkpoint", False):
        overrides.append("checkpoint.trust_checkpoint=true")
    inside_launcher = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if args.nproc_per_node > 1 and not inside_launcher:
        return launch_local(args.config, overrides, args.nproc_per_node)
    from satfuse.distributed.env import exit_cleanly
    from satfuse.engines.pretrain import run_pretrain

    try:
        code = run_pretrain(args.config, overrides)
    except Exception as exc:  # the launcher reports the first rank's line and status
        from satfuse.config import ConfigError
        from satfuse.engines.torchrun import record_rank_error
        from satfuse.utils import SatfuseError

        if isinstance(exc, (SatfuseError, ConfigError)):
            record_rank_error(str(exc))
        raise
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_cleanly(code)  # gloo threads can abort a normal interpreter exit
    return code


def launch_local(config: str | None, overrides: list[str], nproc: int) -> int:
    """Re-run this command under torchrun with `nproc` ranks on this machine.

    Returns the ranks' status (75: saved after a stop signal; 2: bad input), not torchrun's 1.
    The config is loaded here first: a bad path/name or a missing DeepSpeed fails once, with
    one line, instead of on every rank followed by torchrun's traceback.
    """
    from satfuse.config import PretrainConfig, load_config
    from satfuse.resources import require_deepspeed

    if load_config(PretrainConfig, config, overrides).train.engine == "deepspeed":
        require_deepspeed(config or "command line")
    cmd = [sys.executable, "-m", "satfuse.engines.torchrun", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "satfuse.cli", "pretrain"]
    if config:
        cmd += ["--config", config]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd + overrides, env=env)
