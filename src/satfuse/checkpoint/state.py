"""Checkpoint state helpers shared by both backends and by export: the model as a DCP
Stateful, its fingerprint (what must match for a checkpoint to load) and the one message for a
mismatch, and the per-rank state files (`rank_XXXXX.pt`: loader position, RNG, schedule).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from satfuse.checkpoint.layout import crc32
from satfuse.checkpoint.trust import load_torch_file
from satfuse.models.legacy import upgrade_optim_state

# The one wording of "this checkpoint is of another model" (DCP and DeepSpeed loads, export).
MISMATCH_FIX = (
    "this checkpoint was written by a different model config; start a new train.run_dir, or "
    "pass checkpoint.resume=none --force-new-run to move this run to run_dir/previous-<time>/"
)


class ModelOptimState(Stateful):
    """Model (+ optimizer) as one DCP Stateful.

    Uses `get_state_dict`/`set_state_dict`, so DDP's `module.` prefix disappears (a DDP
    checkpoint loads into a bare model, e.g. for export) and optimizer state is keyed by
    parameter name (it reshards like the parameters do).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "optim" in state_dict:  # param_groups name parameters; old checkpoints, old names
            state_dict = {**state_dict, "optim": upgrade_optim_state(state_dict["optim"])}
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"])
        else:
            set_state_dict(
                self.model, self.optimizer,
                model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"],
            )

    def fingerprint(self) -> dict[str, list[int]]:
        """{parameter/buffer name: shape}: what must match for a checkpoint to load. Under
        DeepSpeed ZeRO-3 a parameter outside forward is an empty placeholder; its full shape
        is DeepSpeed's `ds_shape`, so ZeRO-3 and other stages record the same fingerprint."""
        full = {k: list(p.ds_shape) for k, p in self.model.named_parameters() if hasattr(p, "ds_shape")}
        return {k: full.get(k, list(v.shape)) for k, v in get_model_state_dict(self.model).items()
                if isinstance(v, torch.Tensor)}

    def num_parameters(self) -> int:
        """Parameter count; ZeRO-3's partitioned parameters count by their full `ds_numel`."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.model.parameters())



def fingerprint(app_state: dict[str, Any]) -> tuple[dict[str, list[int]], int]:
    """Model fingerprint of every ModelOptimState in app_state (prefixed if several)."""
    models = {k: v for k, v in app_state.items() if isinstance(v, ModelOptimState)}
    fp: dict[str, list[int]] = {}
    n = 0
    for key, mos in models.items():
        prefix = "" if len(models) == 1 else f"{key}/"
        fp.update({f"{prefix}{name}": shape for name, shape in mos.fingerprint().items()})
        n += mos.num_parameters()
    return fp, n


def fingerprint_diff(saved: dict[str, list[int]], current: dict[str, list[int]]) -> list[str]:
    """Human-readable differences between two model fingerprints (empty: same model)."""
    missing = sorted(set(saved) - set(current))
    unexpected = sorted(set(current) - set(saved))
    changed = sorted(k for k in set(saved) & set(current) if list(saved[k]) != list(current[k]))

    def head(keys: list[str], fmt: Any) -> str:
        shown = ", ".join(fmt(k) for k in keys[:8])
        return shown + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    out = []
    if missing:
        out.append("missing in the current model: " + head(missing, str))
    if unexpected:
        out.append("unexpected (not in the checkpoint): " + head(unexpected, str))
    if changed:
        out.append("shape changed: " + head(changed, lambda k: f"{k} {saved[k]} -> {current[k]}"))
    return out


def to_plain(app_state: dict[str, Any]) -> dict[str, Any]:
    """Stateful objects replaced by their state dicts."""
    return {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in app_state.items()}


def write_rank_state(path: Path, rank_state: dict[str, Any]) -> dict[str, Any]:
    """Write and fsync one rank file; returns its size + crc32 record (from the bytes written)."""
    buf = io.BytesIO()
    torch.save(rank_state, buf)
    data = buf.getbuffer()
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return {"size": len(data), "crc32": f"{crc32(data) & 0xFFFFFFFF:08x}"}


def load_rank_state(path: Path, trust: bool = False) -> dict[str, Any]:
    """weights_only only: a rank state is plain containers, numbers, strings and tensors
    (loader position, RNG, schedule, scaler). A file holding anything else was not written
    by satfuse and is refused, naming it, unless the user passed --trust-checkpoint
    (`satfuse.checkpoint.trust`): a crc32 only proves the file is unchanged since the save,
    not who wrote it."""
    return load_torch_file(path, trust)



def short_error(exc: BaseException) -> str:
    """First line of an exception, DCP's wrapped per-rank failures included."""
    text = f"{exc.__class__.__name__}: {exc}".strip()
    for line in text.splitlines():
        if "Errno" in line or "No space" in line:
            return line.strip()[:300]
    return text.splitlines()[0][:300] if text else exc.__class__.__name__
