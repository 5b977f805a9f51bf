"""Consolidated fp32 backbones from a DeepSpeed checkpoint (`satfuse ckpt export` of kind
"deepspeed"), in one process, without torch.distributed.

Why a loader of its own: DeepSpeed keeps the fp32 master weights in its optimizer shards
(ZeRO-1/2/3, and bf16 at any stage: the model states file holds only bf16 copies, and at
ZeRO-3 only empty placeholders), split into flat per-rank partitions; only stage 0 fp32 keeps usable fp32 weights in
`mp_rank_00_model_states.pt`. DeepSpeed's `zero_to_fp32` reassembles the partitions; it
drops tied weights (DeepSpeed #1896), which satfuse's models do not have, and the strict
`load_state_dict` below would catch any missing key.

The output format is `satfuse.checkpoint.export`'s (`satfuse-backbones/1`): the DeepSpeed
backend's `load_model` (`deepspeed_backend`, checkpoint kind "deepspeed") is
`load_deepspeed_model`; DeepSpeed itself is imported only when partitioned shards are merged
(it takes ~2 s). This module also names DeepSpeed's files (`MODEL_STATES`,
`partitioned_files`), which the backend imports from here; it imports neither the backend nor
`export`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from satfuse.checkpoint.layout import checkpoint_problems, read_meta
from satfuse.checkpoint.state import MISMATCH_FIX, fingerprint_diff
from satfuse.checkpoint.trust import (
    check_deepspeed_files,
    deepspeed_weights_only,
    load_rank_files,
    load_torch_file,
)
from satfuse.models.legacy import upgrade_state_dict
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's model file (stage 0 weights, buffers)
# ZeRO-3 writes one model file per rank (its parameters are partitioned): buffers, and the
# parameter names and shapes, without values (those are in the optimizer shards)
ZERO3_MODEL_STATES = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def model_states_files(meta: dict[str, Any]) -> list[str]:
    """The model files a checkpoint of `meta` (its meta.json) must hold: one per rank at
    ZeRO-3, else `MODEL_STATES`."""
    if int((meta.get("deepspeed") or {}).get("zero_stage", 0)) == 3:
        return [ZERO3_MODEL_STATES.format(rank=r) for r in range(int(meta.get("world_size", 1)))]
    return [MODEL_STATES]


def model_states_file(ckpt: Path) -> Path:
    """The file holding the model's buffers: `MODEL_STATES`, or rank 0's at ZeRO-3 (every
    rank's holds the same, unpartitioned, buffers)."""
    plain = Path(ckpt) / MODEL_STATES
    zero3 = Path(ckpt) / ZERO3_MODEL_STATES.format(rank=0)
    return zero3 if not plain.is_file() and zero3.is_file() else plain


def partitioned_files(ckpt: Path) -> list[Path]:
    """DeepSpeed's per-DP-rank optimizer shards (ZeRO 1/2/3, or bf16 at stage 0)."""
    return sorted(Path(ckpt).glob("*zero_pp_rank_*_optim_states.pt"))


def fp32_state_dict(ckpt_dir: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict (parameters and buffers) of a DeepSpeed checkpoint.

    DeepSpeed's files are read weights-only (its few inert classes allowed) unless `trust`
    (`satfuse.checkpoint.trust`); a file holding anything else is refused, naming it."""
    ckpt_dir = Path(ckpt_dir)
    check_deepspeed_files(ckpt_dir, trust)
    if partitioned_files(ckpt_dir):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils import zero_to_fp32  # optional: deepspeed

        with contextlib.redirect_stdout(io.StringIO()), deepspeed_weights_only(trust):  # it prints per-tensor progress
            sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    states = ckpt_dir / MODEL_STATES
    if not states.is_file():
        raise SatfuseError(f"{ckpt_dir}: no {MODEL_STATES}: not a DeepSpeed checkpoint directory")
    # Stage 0 model states are tensors and containers: weights_only, like every file here.
    module = load_torch_file(states, trust)["module"]
    if any(v.dtype == torch.float16 for v in module.values()):
        log.warning("%s: stage-0 fp16 checkpoint: exporting its fp16 weights upcast to fp32", ckpt_dir)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in module.items()}


def load_deepspeed_model(ckpt_dir: Path, builder: Callable[[dict[str, Any]], nn.Module],
                         trust: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The DeepSpeed backend's exporter (`CheckpointBackend.load_model`): verify, build the model from meta.json, load fp32 weights."""
    ckpt_dir = Path(ckpt_dir)
    problems = checkpoint_problems(ckpt_dir, checksums=True)
    if problems:
        raise SatfuseError(f"{ckpt_dir}: not a complete checkpoint: {'; '.join(problems)}; export another one")
    meta = read_meta(ckpt_dir)
    if meta.get("kind") != "deepspeed":
        raise SatfuseError(f"{ckpt_dir}: a {meta.get('kind', 'dcp')} checkpoint, not DeepSpeed; use `satfuse ckpt export`")
    load_rank_files(ckpt_dir, int(meta.get("world_size", 0)), trust)
    model = builder(meta)
    sd = upgrade_state_dict(fp32_state_dict(ckpt_dir, trust))  # pre-torchvision names renamed
    diff = fingerprint_diff({k: list(v.shape) for k, v in sd.items()},
                            {k: list(v.shape) for k, v in model.state_dict().items()})
    if diff:
        raise SatfuseError(f"{ckpt_dir}: model mismatch ({'; '.join(diff)}): {MISMATCH_FIX}")
    model.load_state_dict(sd, strict=True)
    return model, meta
