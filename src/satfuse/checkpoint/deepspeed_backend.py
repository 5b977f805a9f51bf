"""The DeepSpeed checkpoint backend: DeepSpeed's own sharded `save_checkpoint` /
`load_checkpoint` inside satfuse's commit protocol (`satfuse.checkpoint.protocol`), using only
its public API, plus the conversion to DeepSpeed's universal format when the world size or
ZeRO layout changed; registered as checkpoint kind "deepspeed" (`satfuse.checkpoint.backend`
is the contract). DeepSpeed itself is imported by the engine (`engines/deepspeed_engine.py`),
never here.

Each rank hashes the files it wrote: its own optimizer shard(s), and on rank 0 the model
states and whatever else DeepSpeed writes once per checkpoint (`written_by`), so no rank reads
another rank's shards back.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from satfuse.checkpoint.backend import Builder, CheckpointBackend
from satfuse.checkpoint.deepspeed_export import (
    load_deepspeed_model,
    model_states_file,
    model_states_files,
    partitioned_files,
)
from satfuse.checkpoint.layout import RANK_FILE_RE, rank_file, read_meta
from satfuse.checkpoint.protocol import remove_tree
from satfuse.checkpoint.state import (
    MISMATCH_FIX,
    fingerprint,
    load_rank_state,
    write_rank_state,
)
from satfuse.checkpoint.trust import (
    check_deepspeed_files,
    deepspeed_weights_only,
    load_torch_file,
    reason,
    refusal,
    unpickling_cause,
)
from satfuse.diskspace import free_bytes, is_no_space
from satfuse.distributed.collectives import barrier, broadcast_object, rank, world
from satfuse.registry import CHECKPOINT_BACKENDS
from satfuse.utils import SatfuseError

if TYPE_CHECKING:
    from satfuse.config import CheckpointConfig

log = logging.getLogger(__name__)

# DeepSpeed's per-rank shard names: `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`, and at
# ZeRO-3 also `zero_pp_rank_R_mp_rank_00_model_states.pt`
_SHARD_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt$")


def _fsync_files(paths: list[Path]) -> None:
    """DeepSpeed's torch.save does not fsync; the writer makes its own shards durable
    before rank 0 commits the directory."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def written_by(tmp: Path, me: int) -> list[Path]:
    """The DeepSpeed files rank `me` wrote into `tmp` (after `save_checkpoint`, which ends with
    a barrier, so every rank's files exist): its optimizer shard(s) (and model shard at
    ZeRO-3); rank 0 also every file
    DeepSpeed writes once (model states, the recovery scripts), i.e. all that is neither a
    shard nor a rank file. Nothing of another rank is listed, so nothing of it is read here."""
    mine = []
    for p in tmp.iterdir():
        shard = _SHARD_RE.search(p.name)
        if shard is not None:
            if int(shard.group(1)) == me:
                mine.append(p)
        elif me == 0 and p.is_file() and not RANK_FILE_RE.match(p.name):
            mine.append(p)
    return sorted(mine)


# Runs DeepSpeed's converter with every torch.load weights-only (DeepSpeed's inert classes
# allowed), as in-process loads are (`satfuse.checkpoint.trust`).
_SAFE_CONVERTER = (
    "import os, runpy, sys, torch\n"
    "from satfuse.checkpoint.trust import deepspeed_safe_globals\n"
    "os.environ['TORCH_FORCE_WEIGHTS_ONLY_LOAD'] = '1'\n"
    "torch.serialization.add_safe_globals(deepspeed_safe_globals())\n"
    "sys.argv[0] = 'ds_to_universal'\n"
    "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__')\n"
)


def convert_to_universal(src: Path, out: Path, timeout_s: int = 1800, trust: bool = False) -> None:
    """DeepSpeed's universal checkpoint of `src` in `out` (rank 0 only; a subprocess, so its
    worker pools and memory never live in a training rank). `--inject_missing_state` is
    needed for models that do not declare universal-checkpoint info (all of ours). Without
    `trust` the converter's loads are weights-only too."""
    remove_tree(out)
    entry = ["-m", "deepspeed.checkpoint.ds_to_universal"] if trust else ["-c", _SAFE_CONVERTER]
    cmd = [sys.executable, *entry, "--input_folder", str(src),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    if res.returncode != 0:
        remove_tree(out)
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SatfuseError(
            f"{src}: conversion to a universal checkpoint failed ({tail[0][:300]}); resume on "
            f"the world size that saved it"
        )


@CHECKPOINT_BACKENDS.register("deepspeed")
class DeepSpeedCheckpointManager(CheckpointBackend):
    """Save/find/load DeepSpeed checkpoints with the DCP backend's guarantees and layout.

    `run_dir/checkpoints/step_XXXXXXXX/` holds DeepSpeed's files (`mp_rank_00_model_states.pt`,
    `*zero_pp_rank_R_mp_rank_00_optim_states.pt`), the per-rank `rank_XXXXX.pt` (loader
    position, RNG, schedule) and `meta.json` (kind "deepspeed"), so `satfuse ckpt ls/inspect`
    and `resume=auto` treat both kinds alike. Every rank calls save and load (DeepSpeed
    #2993). Saves go to the protocol's `.tmp-step_X` (DeepSpeed's tag), every writer fsyncs
    its shards, and the protocol commits (meta.json last, rename, `latest`, prune). A
    checkpoint of another world size or ZeRO layout is converted to DeepSpeed's universal
    format by rank 0 (a temporary `.universal-step_X` beside it, removed after loading).

    `engine`: the `satfuse.engines.deepspeed_engine.DeepSpeedEngine` (its DeepSpeed engine
    `model`, bare `module`, `zero_stage`, `describe()` and `precision`).
    """

    kind = "deepspeed"
    label = "DeepSpeed"

    def __init__(self, run_dir: Path, engine: Any, keep_last: int = 3, keep_every: int = 0,
                 timeout_s: float = 1800.0, trust: bool = False, every_steps: int = 0) -> None:
        super().__init__(run_dir, keep_last=keep_last, keep_every=keep_every, timeout_s=timeout_s,
                         trust=trust, every_steps=every_steps)
        self.engine = engine

    @classmethod
    def from_config(cls, run_dir: Path, section: CheckpointConfig, timeout_s: float,
                    **engine: Any) -> DeepSpeedCheckpointManager:
        """The manager of the `checkpoint` config section; `engine=` the DeepSpeedEngine."""
        return cls(run_dir, engine["engine"], **cls.config_kwargs(section, timeout_s))

    @classmethod
    def required_files(cls, meta: dict[str, Any]) -> list[str]:
        """DeepSpeed's model states (every stage writes them, one file per rank at ZeRO-3;
        optimizer shards are listed per rank)."""
        return model_states_files(meta)

    @classmethod
    def claims(cls, path: Path) -> bool:
        """A DeepSpeed tag directory: it holds `*model_states.pt`."""
        return any(Path(path).glob("*model_states.pt"))

    @classmethod
    def load_model(cls, ckpt_dir: Path, builder: Builder, trust: bool = False
                   ) -> tuple[nn.Module, dict[str, Any]]:
        """`deepspeed_export.load_deepspeed_model`: consolidated fp32 weights, one process."""
        return load_deepspeed_model(ckpt_dir, builder, trust)

    @classmethod
    def check_files(cls, ckpt_dir: Path, trust: bool = False) -> None:
        """`trust.check_deepspeed_files`: DeepSpeed's files hold only its inert records."""
        check_deepspeed_files(Path(ckpt_dir), trust)

    # ---------------------------------------------------------------- save
    def save(self, step: int, app_state: dict[str, Any], rank_state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """DeepSpeed's `save_checkpoint` of the engine's model and optimizer (`app_state`
        gives the fingerprint: the same model) into the protocol's temp directory."""
        me = rank()
        staged = self.begin(step, meta, *fingerprint(app_state), deepspeed=self.engine.describe())
        local_error = None
        written: dict[str, dict[str, Any] | None] = {}
        try:
            written[rank_file(me)] = write_rank_state(staged.tmp / rank_file(me), rank_state)
            self.engine.model.save_checkpoint(str(self.ckpt_dir), tag=staged.tmp.name, save_latest=False)
            mine = written_by(staged.tmp, me)
            _fsync_files(mine)
            written.update((p.name, None) for p in mine)  # hashed by this rank in `finish`
        except (OSError, RuntimeError) as exc:
            local_error = f"rank {me}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            # torch.save on a full disk says only "unexpected pos 128 vs 0": ask the disk
            if is_no_space(exc) or free_bytes(staged.tmp) < max(self.needed_estimate(), 1 << 20):
                local_error = f"rank {me}: No space left on device (DeepSpeed: {local_error.split(': ', 1)[1]})"
        return self.finish(staged, local_error, written)

    # ---------------------------------------------------------------- load
    def load(self, path: Path, app_state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """DeepSpeed's `load_checkpoint` into the engine (directly, or through a universal
        checkpoint when the world size or ZeRO layout changed); `app_state` gives the
        fingerprint the checkpoint must match."""
        path = self.verify(Path(path))
        meta = read_meta(path)
        self.check_kind(path, meta)
        self.check_model(path, meta, fingerprint(app_state)[0])
        check_deepspeed_files(path, self.trust)  # names a refused file on every rank
        universal = self._needs_universal(path, meta)
        if universal:
            self._load_universal(path, meta)
        else:
            self._load_ds(path.parent, path.name)
        states = [load_rank_state(path / rank_file(r), self.trust) for r in range(int(meta["world_size"]))]
        self.loaded_path = path
        log.info("loaded %s (step %s, saved by %s ranks%s)", path, meta.get("step"),
                 meta["world_size"], ", via a universal checkpoint" if universal else "")
        return states, meta

    def _needs_universal(self, path: Path, meta: dict[str, Any]) -> bool:
        """Direct load when the shards fit this run; universal when only their partitioning
        differs; refuse when the optimizer state would silently be lost."""
        saved = meta.get("deepspeed") or {}
        saved_partitioned = bool(partitioned_files(path))
        now_partitioned = self.engine.zero_stage > 0 or self.cfg_precision == "bf16"
        if saved_partitioned != now_partitioned:
            raise SatfuseError(
                f"{path}: saved with ZeRO stage {saved.get('zero_stage')} / {saved.get('precision')}, "
                f"whose optimizer state layout cannot load into stage {self.engine.zero_stage} / "
                f"{self.cfg_precision} (it would be silently reset); resume with "
                f"deepspeed.zero_stage={saved.get('zero_stage')} train.precision={saved.get('precision')}"
            )
        if not saved_partitioned:
            return False  # stage 0 fp32/fp16: replicated state, any world size loads it
        was3, now3 = int(saved.get("zero_stage", 0)) == 3, self.engine.zero_stage == 3
        if was3 != now3:
            # DeepSpeed 0.19.8's universal checkpoint does not cross the ZeRO-3 boundary:
            # 2 -> 3 lacks the stage-3 optimizer record (`zero/optimizer_state.pt`), 3 -> 2 the
            # version in the model states (measured); any world size within one side works
            raise SatfuseError(
                f"{path}: saved with ZeRO stage {saved.get('zero_stage')}, which DeepSpeed cannot "
                f"convert to stage {self.engine.zero_stage} with its optimizer state; resume with "
                f"deepspeed.zero_stage={saved.get('zero_stage')} (any world size), or start a new run "
                f"from its weights (`satfuse ckpt export`)"
            )
        same = (int(meta["world_size"]) == world()
                and saved.get("zero_stage") == self.engine.zero_stage
                and saved.get("precision") == self.cfg_precision)
        return not same

    @property
    def cfg_precision(self) -> str:
        return self.engine.precision

    def _load_ds(self, load_dir: Path, tag: str) -> None:
        try:
            with deepspeed_weights_only(self.trust):
                loaded, _ = self.engine.model.load_checkpoint(
                    str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as exc:  # noqa: BLE001 - one line for the user, chained for debugging
            refused = unpickling_cause(exc)
            if refused is not None:
                raise refusal(load_dir / tag, reason(refused)) from None
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SatfuseError(
                f"{load_dir / tag}: DeepSpeed could not load it ({type(exc).__name__}: {first[:300]}); "
                "resume with the ZeRO stage, precision and world size that saved it"
            ) from exc
        if loaded is None:
            raise SatfuseError(f"{load_dir / tag}: DeepSpeed found no model states in it; it is damaged")

    def _restore_buffers(self, path: Path) -> None:
        """A universal load restores parameters only; BatchNorm running statistics would be
        silently reset to their initial values (measured). Copy every buffer back from the
        saved model states."""
        saved = load_torch_file(model_states_file(path), self.trust)["module"]
        missing = []
        with torch.no_grad():
            for name, buf in self.engine.module.named_buffers():
                if name in saved:
                    buf.copy_(saved[name].to(buf.dtype))
                else:
                    missing.append(name)
        if missing:
            raise SatfuseError(f"{path}: buffers {missing[:5]} are not in the checkpoint; {MISMATCH_FIX}")

    def _load_universal(self, path: Path, meta: dict[str, Any]) -> None:
        group = self.group()
        out = self.ckpt_dir / f".universal-{path.name}"
        error = None
        if rank() == 0:
            log.info("converting %s (world size %s) to a universal checkpoint for world size %d",
                     path, meta["world_size"], world())
            try:
                convert_to_universal(path, out, trust=self.trust)
            except (SatfuseError, OSError, TimeoutError) as exc:
                error = str(exc)
        error = broadcast_object(error, group)
        if error:
            raise SatfuseError(error)
        cfg = self.engine.model._config
        cfg.load_universal_checkpoint = True
        try:
            self._load_ds(out.parent, out.name)
            self._restore_buffers(path)
        finally:
            cfg.load_universal_checkpoint = False
            barrier(group)
            if rank() == 0:
                remove_tree(out)
                # ds_to_universal also points `latest_universal` at its output: not ours to keep
                (self.ckpt_dir / "latest_universal").unlink(missing_ok=True)
