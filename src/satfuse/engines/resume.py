"""Resuming a pretraining run: which checkpoint, whether it fits this run, and restoring it.

The continuation is bitwise equal to an uninterrupted run on the same world size: model and
optimizer (the engine's load), the LR schedule and loss scaler (the engine state), the step,
every rank's loader position and RNG state. A checkpoint trained on other bands is refused
before loading (there it would be a shape error); a changed config key is refused unless it
may change on resume (`run_records.refuse_changes`), and the accepted changes are recorded in
overrides.jsonl. On another world size the loader re-deals the interrupted epoch and the
RNG state is not restored (it was per rank).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from satfuse.checkpoint.layout import read_meta
from satfuse.config import CheckpointConfig, OptimConfig
from satfuse.data.format.bands import check_same_bands, normalization_bands
from satfuse.data.reading.pretrain_loader import PretrainLoader
from satfuse.distributed.env import DistEnv
from satfuse.engines.base import Engine
from satfuse.engines.optim import apply_hparams
from satfuse.engines.rng import restore_rng
from satfuse.engines.run_records import config_changes, record_overrides, refuse_changes
from satfuse.engines.rundir import prepare_fresh_start
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)


def resume_run(engine: Engine, loader: PretrainLoader, env: DistEnv, checkpoint: CheckpointConfig,
               optim: OptimConfig, config: dict[str, Any], run_dir: Path, shards_spec: str) -> int | None:
    """Restore `engine` and `loader` from the checkpoint `checkpoint.resume` names; the step
    resumed at, or None for a fresh start. `config` is this run's whole config as a dict (to
    compare with the saved one), `optim` re-applied when its keys changed, `shards_spec` names
    the training shards in a band mismatch."""
    path = engine.find_resume(checkpoint.resume_spec)
    if path is None:
        if env.rank == 0 and checkpoint.resume_spec.kind == "auto":
            # an earlier run that died before its first checkpoint: its metrics would mix
            # with this run's (steps 1.. twice), so its files go to previous-<time>/
            prepare_fresh_start(run_dir, force=True)
        return None
    check_checkpoint_bands(path, loader.bands, shards_spec)  # before loading: a shape error there
    rank_states, meta = engine.load(path)
    path = engine.resumed_from or path  # an older one if `path` proved damaged while loading
    same_world = len(rank_states) == env.world_size
    mine = rank_states[env.rank] if same_world else rank_states[0]
    changed = config_changes(meta.get("config") or {}, config)
    refuse_changes(changed, path)
    step = int(mine["step"])
    engine.load_engine_state(mine["engine"])
    if any(k.startswith("optim.") for k in changed):  # the restored optimizer had the old values
        apply_hparams(engine.optimizer, engine.scheduler, optim)
    if env.rank == 0:
        record_overrides(run_dir, step, path, changed)
    loader.load_state_dict([s["loader"] for s in rank_states])
    if same_world:
        restore_rng(mine["rng"])
    log.info("resumed from %s at step %d (saved by %d ranks, now %d)", path, step, len(rank_states), env.world_size)
    return step


def check_checkpoint_bands(path: Path, bands: dict[str, list[str]], shards_spec: str) -> None:
    """Refuse to resume a checkpoint trained on other bands than the shard set holds."""
    try:
        meta = read_meta(path)
    except SatfuseError:
        return  # the engine's load reports an unreadable checkpoint
    trained = normalization_bands(meta.get("normalization"))
    if trained is not None:
        check_same_bands(trained, bands, str(path), shards_spec)
