"""One consolidated file of the pretrained backbones, for fine-tuning without torch.distributed.

Why a separate format: a pretraining checkpoint is sharded, holds optimizer state three times
the model's size, and needs the DCP reader; a fine-tuning script wants `torch.load(path,
weights_only=True)` and a dict of backbone state dicts, plus the normalisation the backbones
were trained with (torchgeo #4061: silent /255 when it is not stored with the weights).

`load_model` picks the exporter of the checkpoint's recorded kind (meta.json "kind") from
`satfuse.registry.CHECKPOINT_BACKENDS` (`CheckpointBackend.load_model`), which returns (model
with the checkpoint's weights, meta): the DCP one is `load_dcp_model` here, the DeepSpeed one
lives in `satfuse.checkpoint.deepspeed_export`.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from satfuse.checkpoint.backend import Builder, backend_of
from satfuse.checkpoint.dcp_storage import DCP_METADATA, MmapReader
from satfuse.checkpoint.layout import META_NAME, checkpoint_problems, normalization_path, read_meta
from satfuse.checkpoint.resolve import resolve_checkpoint
from satfuse.checkpoint.state import MISMATCH_FIX, fingerprint_diff
from satfuse.checkpoint.trust import load_rank_files, read_dcp_metadata
from satfuse.config import ModelConfig, from_dict
from satfuse.data.format.bands import channels, normalization_bands
from satfuse.models import build_pretrain_model
from satfuse.models.legacy import upgrade_fingerprint
from satfuse.run_layout import CHECKPOINTS
from satfuse.utils import SatfuseError, atomic_write_bytes, sha256_file

log = logging.getLogger(__name__)

EXPORT_FORMAT = "satfuse-backbones/1"



def default_builder(meta: dict[str, Any]) -> nn.Module:
    """The pretraining model described by the checkpoint's own config."""
    cfg = (meta.get("config") or {}).get("model")
    if not isinstance(cfg, dict):
        raise SatfuseError(
            "checkpoint meta.json has no config.model section; it was not written by "
            "`satfuse pretrain`: pass --builder MODULE:FUNCTION that builds the model"
        )

    bands = normalization_bands(meta.get("normalization"))  # the input bands it was trained on
    crop = ((meta.get("config") or {}).get("data") or {}).get("crop")  # ViT/Swin are sized by it
    return build_pretrain_model(from_dict(ModelConfig, cfg, where=META_NAME, prefix="model."),
                                channels(bands) if bands else None, img_size=int(crop) if crop else None)


def weights_identity(path: str | Path) -> str | None:
    """What a fine-tuning run records as the identity of the weights it started from (None:
    `path` does not exist): the sha256 of a weights file (and of the normalisation JSON beside
    it, which plain weights are standardised with), or of a checkpoint step's meta.json (every
    file's size and crc32, written last) for a checkpoint or run directory.

    Why contents and not the path: the demo and most sweeps export to one fixed name
    (`runs/pretrain/backbone.pt`), so after retraining the same path holds other weights and a
    sweep comparing paths would reuse results of the old ones. One hash per sweep and checkpoint
    (`satfuse.evaluation.sweep.plan_sweep`), not per run."""
    p = Path(path)
    if p.is_file():
        side = normalization_path(p)
        ident = f"sha256:{sha256_file(p)}"
        return ident + (f"+{side.name}:{sha256_file(side)}" if side.is_file() and side != p else "")
    if p.is_dir():
        step = resolve_checkpoint(p)
        meta = step / META_NAME
        if meta.is_file():
            return f"{step.name}/{META_NAME}:sha256:{sha256_file(meta)}"
        files = sorted(f for f in step.rglob("*") if f.is_file())
        return "files:" + ",".join(f"{f.relative_to(step)}:{sha256_file(f)}" for f in files)
    return None


def check_export_out(ckpt_dir: Path, outs: list[Path], overwrite: bool = False) -> None:
    """Refuse export outputs (`outs`: the file and any written beside it) that would replace
    a file unasked, or any file of the checkpoints being read.

    Why the checkpoints/ directory as a whole: a file written there can replace a shard of
    the step being exported (`__0_0.distcp`) or of another step, whatever --overwrite says;
    `ckpt ls` and pruning own that directory."""
    step = Path(ckpt_dir).resolve()
    roots = [step, *([step.parent] if step.parent.name == CHECKPOINTS else [])]
    for out in outs:
        where = Path(out).resolve()
        inside = next((r for r in roots if where == r or r in where.parents), None)
        if inside is not None:
            raise SatfuseError(f"--out {out}: inside {inside}, which holds the checkpoints being exported; "
                               "write the export outside the run's checkpoints/ directory")
        if Path(out).is_dir():
            raise SatfuseError(f"--out {out}: is a directory; pass a file name, e.g. {Path(out) / 'backbone.pt'}")
        if (Path(out).exists() or Path(out).is_symlink()) and not overwrite:
            raise SatfuseError(f"{out}: exists; pass --overwrite to replace it, or another --out")


def load_dcp_model(ckpt_dir: Path, builder: Builder, trust: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The DCP backend's exporter (`CheckpointBackend.load_model`). Verify a DCP checkpoint and load its model weights in this one process. Every file is
    read as data (`satfuse.checkpoint.trust`); the rank files are checked although export
    does not need them, so a crafted checkpoint is refused as a whole."""
    problems = checkpoint_problems(ckpt_dir, checksums=True)
    if problems:
        raise SatfuseError(f"{ckpt_dir}: not a complete checkpoint: {'; '.join(problems)}; export another one")
    meta = read_meta(ckpt_dir)
    load_rank_files(ckpt_dir, int(meta.get("world_size", 0)), trust)
    read_dcp_metadata(Path(ckpt_dir) / DCP_METADATA, trust)
    model = builder(meta)
    sd = model.state_dict()
    saved = upgrade_fingerprint((meta.get("model") or {}).get("fingerprint"))
    if saved is not None:
        diff = fingerprint_diff(saved, {k: list(v.shape) for k, v in sd.items()})
        if diff:
            raise SatfuseError(f"{ckpt_dir}: model mismatch ({'; '.join(diff)}): {MISMATCH_FIX}")
    state = {"model_optim": {"model": sd}}  # only the model: optimizer state is never read
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        reader = MmapReader(ckpt_dir)  # safe .metadata (unless trust) + old names renamed
        reader.trust = trust
        dcp.load(state, storage_reader=reader, no_dist=True)
    model.load_state_dict(state["model_optim"]["model"], strict=True)
    return model, meta


def load_model(ckpt_dir: Path, builder: Builder | None = None, trust: bool = False
               ) -> tuple[nn.Module, dict[str, Any], str]:
    """(model with the weights of the step directory `ckpt_dir`, meta, kind), by the exporter
    of the backend that wrote it (`backend.backend_of`)."""
    backend = backend_of(ckpt_dir)
    model, meta = backend.load_model(Path(ckpt_dir), builder or default_builder, trust)
    return model, meta, backend.kind


def export_backbones(ckpt_dir: Path, out: Path, builder: Builder | None = None,
                     trust: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write `out` (atomically) with the backbones of the checkpoint; returns a summary.
    `trust` (--trust-checkpoint): read checkpoint files that are not plain data anyway.
    An existing `out` is replaced only with `overwrite`, one among the checkpoints never
    (`check_export_out`, here in the writer so that no caller skips it)."""
    ckpt_dir, out = resolve_checkpoint(Path(ckpt_dir)), Path(out)
    check_export_out(ckpt_dir, [out], overwrite)
    model, meta, kind = load_model(ckpt_dir, builder, trust)
    if not (hasattr(model, "backbones") and hasattr(model, "in_channels")):
        raise SatfuseError(f"{type(model).__name__} has no backbones()/in_channels(); the builder must return a satfuse pretraining model")
    backbones: dict[str, nn.Module] = model.backbones()
    model_cfg = (meta.get("config") or {}).get("model") or {}
    doc = {
        "format": EXPORT_FORMAT,
        "method": str(model_cfg.get("method", getattr(model, "method", ""))),
        "backbone": str(model_cfg.get("backbone", "")),
        "in_channels": {k: int(v) for k, v in model.in_channels().items()},
        "state_dicts": {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                        for name, m in backbones.items()},
        "normalization": meta.get("normalization"),
        "step": int(meta.get("step", -1)),
        "source": str(ckpt_dir),
    }
    buf = io.BytesIO()
    torch.save(doc, buf)
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as exc:
        raise SatfuseError(f"{out}: cannot write the export ({exc.strerror or exc}); choose another --out") from None
    n = sum(t.numel() for sd in doc["state_dicts"].values() for t in sd.values())
    summary = {"out": str(out), "kind": kind, "step": doc["step"], "backbones": sorted(backbones),
               "parameters": n, "bytes": out.stat().st_size}
    log.info("exported %s backbones of %s -> %s", ", ".join(sorted(backbones)), ckpt_dir, out)
    return summary


def load_backbones(path: Path) -> dict[str, Any]:
    """Read an export back (weights_only: no code runs), checking its format."""
    path = Path(path)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SatfuseError(f"{path}: not found; create it with `satfuse ckpt export CKPT --out {path}`") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise SatfuseError(f"{path}: not a readable backbone export ({exc.__class__.__name__}); re-export it") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise SatfuseError(f"{path}: not a satfuse backbone export (expected format {EXPORT_FORMAT}); re-export it")
    return doc
