"""Entry point of one pretraining process (one rank): config -> process group -> Trainer.

Every launcher ends here: `torchrun ... satfuse pretrain`, `satfuse pretrain --nproc-per-node N`
(which starts torchrun for you), the submitit task of `satfuse submit pretrain`, and the plain
`slurm/pretrain.sbatch`. The return value is the process exit status: 0 when the configured
steps are done, `REQUEUE_EXIT_CODE` (75) when a stop signal made every rank save and stop,
`STOP_EXIT_CODE` (143) when that signal was SIGTERM (scancel): saved, not to be requeued.
"""

from __future__ import annotations

import logging

from satfuse.config import PretrainConfig, load_config, validate_pretrain
from satfuse.data.reading.shard_sets import resolve_shards, split_spec
from satfuse.distributed.env import comm_failure, init_distributed, teardown
from satfuse.distributed.launcher_env import process_rank
from satfuse.engines.trainer import Trainer, TrainResult
from satfuse.exit_codes import REQUEUE_EXIT_CODE, STOP_EXIT_CODE
from satfuse.registry import ENGINES

log = logging.getLogger(__name__)

__all__ = ["REQUEUE_EXIT_CODE", "run_pretrain", "pretrain"]


def pretrain(cfg: PretrainConfig) -> TrainResult:
    """Train in this process (the process group is initialised from the environment)."""
    env = init_distributed(timeout_s=cfg.train.comm_timeout_s)
    trainer = Trainer(cfg, env)
    try:
        return trainer.fit()
    except RuntimeError as exc:  # a peer died or the network broke: say which, not a traceback
        if env.world_size > 1 and is_comm_error(exc):
            raise comm_failure(exc, f"step {trainer.step}") from exc
        raise


def is_comm_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "read error", "closed"))


def show_shell_commands(cfg: PretrainConfig, where: str) -> list[str]:
    """Log every `pipe:` shard URL (a shell command this run will execute) with where it came
    from. Why: a `pipe:` URL is code; it is only ever taken from the user's own YAML or command
    line (never from a checkpoint's recorded config), and it is shown before it runs."""
    specs = [*(cfg.data.shards if isinstance(cfg.data.shards, list) else [cfg.data.shards]), cfg.data.val_shards]
    cmds = [u for spec in specs for u in split_spec(spec or "") if u.startswith("pipe:")]
    if cmds and process_rank() == 0:
        log.warning("data.shards/val_shards from %s run %d shell command(s): %s", where, len(cmds),
                    "; ".join(c[len("pipe:"):] for c in cmds[:4]) + (" ..." if len(cmds) > 4 else ""))
    return cmds


def precheck(config_path: str | None, overrides: list[str]) -> PretrainConfig:
    """What a launcher checks before it starts ranks: the config (keys, types, ranges) and
    that the shards resolve. One line, once, instead of one traceback per rank."""
    cfg = load_config(PretrainConfig, config_path, overrides)
    validate_pretrain(cfg)
    ENGINES.get(cfg.train.engine).check_installed(config_path or "command line")
    resolve_shards(cfg.data.shards, cfg.data.manifest, cfg.data.shard_weights)
    if cfg.data.val_shards:
        resolve_shards(cfg.data.val_shards)
    return cfg


def run_pretrain(config_path: str | None, overrides: list[str]) -> int:
    cfg = load_config(PretrainConfig, config_path, overrides)
    ENGINES.get(cfg.train.engine).check_installed(config_path or "command line")
    validate_pretrain(cfg)
    show_shell_commands(cfg, config_path or "the command line")
    try:
        result = pretrain(cfg)
    finally:
        teardown()
    if result.status == "preempted":
        return REQUEUE_EXIT_CODE
    if result.status == "stopped":
        return STOP_EXIT_CODE
    if result.status != "already_complete":
        log.info("done: step %d, loss %.4f, %d samples skipped as undecodable", result.step, result.final_loss,
                 result.skipped_samples)
    return 0
