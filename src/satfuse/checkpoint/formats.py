"""Export formats that tools outside satfuse open: torchvision / timm state dicts and safetensors.

Why: a pretrained backbone is only useful if it loads where people already work. satfuse's
ResNet-18/50 are torchvision's, so each modality's state dict loads with `strict=True` into
`torchvision.models.resnet50()` (or timm's `resnet50`, same names) once its `conv1` takes that
modality's channel count (2 for S1, 13 for S2); the classifier `fc` is the only thing it lacks.
A timm backbone's state dict is timm's (`Backbone.library_layout` strips satfuse's prefix) and
loads into `timm.create_model(NAME, in_chans=C, img_size=CROP, num_classes=0)`.

- `torchvision` / `timm`: `torch.save({"s1": state_dict, "s2": state_dict})`, plain tensors only
  (`torch.load(..., weights_only=True)`), plus `<out stem>.normalization.json` beside it:
  the band means/stds and clipping the backbones were trained with (feed them anything else
  and the features are off), the architecture, the `create_model` call and the crop
  (`img_size`) the weights were trained at.
- `safetensors`: the same tensors in one `.safetensors` file, keys prefixed by modality
  (`s2.conv1.weight`), with the same normalisation JSON in the file's metadata (and beside).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from satfuse.checkpoint import export as export_mod
from satfuse.checkpoint.layout import normalization_path
from satfuse.models.backbones import backbone_class, check_export_format
from satfuse.utils import SatfuseError, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

FORMATS = ("satfuse", "torchvision", "timm", "safetensors")
NORMALIZATION_FORMAT = "satfuse-normalization/1"
HOW = ("x = (clip(raw, clip[0], clip[1]) - mean) / std per band, bands in the listed order; "
       "NaN/Inf -> the band mean (0 after standardising)")


def _load_model(ckpt_dir: Path, builder: export_mod.Builder | None, trust: bool = False) -> tuple[nn.Module, dict, Path, str]:
    ckpt_dir = export_mod.resolve_checkpoint(Path(ckpt_dir))
    model, meta, kind = export_mod.load_model(ckpt_dir, builder, trust)
    if not (hasattr(model, "backbones") and hasattr(model, "in_channels")):
        raise SatfuseError(f"{type(model).__name__} has no backbones()/in_channels(); the builder "
                           "must return a satfuse pretraining model")
    return model, meta, ckpt_dir, kind


def plain_backbones(ckpt_dir: Path, builder: export_mod.Builder | None = None, trust: bool = False,
                    fmt: str = "torchvision",
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """({modality: torchvision-named state dict}, normalisation document, summary) of a checkpoint,
    refused when its backbone does not declare `fmt` among its export formats."""
    model, meta, ckpt_dir, kind = _load_model(ckpt_dir, builder, trust)
    model_cfg = (meta.get("config") or {}).get("model") or {}
    backbone = str(model_cfg.get("backbone", ""))
    check_export_format(backbone or "?", fmt, str(ckpt_dir))
    crop = ((meta.get("config") or {}).get("data") or {}).get("crop") or None
    sds, how = {}, {}
    for name, m in model.backbones().items():
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in m.state_dict().items()}
        sds[name], how = backbone_class(backbone).library_layout(sd, crop)
    doc = {
        "format": NORMALIZATION_FORMAT,
        **how,
        "backbone": backbone,
        "method": str(model_cfg.get("method", getattr(model, "method", ""))),
        "in_channels": {k: int(v) for k, v in model.in_channels().items()},
        "normalization": meta.get("normalization"),
        "how": HOW,
        "step": int(meta.get("step", -1)),
        "source": str(ckpt_dir),
    }
    summary = {"kind": kind, "step": doc["step"], "backbones": sorted(sds), "backbone": backbone,
               "parameters": sum(t.numel() for sd in sds.values() for t in sd.values())}
    return sds, doc, summary


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")


def export_torchvision(ckpt_dir: Path, out: Path, builder: export_mod.Builder | None = None, trust: bool = False,
                       overwrite: bool = False, fmt: str = "torchvision") -> dict[str, Any]:
    """Write `out` = {modality: state dict} (torch.save, plain tensors) in the `fmt` library's
    layout (torchvision or timm) and its normalisation JSON; an existing one of them is
    replaced only with `overwrite` (`check_export_out`)."""
    out = Path(out)
    export_mod.check_export_out(export_mod.resolve_checkpoint(Path(ckpt_dir)), [out, normalization_path(out)], overwrite)
    sds, doc, summary = plain_backbones(ckpt_dir, builder, trust, fmt)
    buf = io.BytesIO()
    torch.save(sds, buf)
    _write(out, buf.getvalue())
    norm = normalization_path(out)
    _write_json(norm, {**doc, "weights": out.name})
    log.info("exported %s (%s names) -> %s, normalisation -> %s", ", ".join(sds), fmt, out, norm)
    return {"out": str(out), "normalization": str(norm), "format": fmt, **summary,
            "bytes": out.stat().st_size}


def export_safetensors(ckpt_dir: Path, out: Path, builder: export_mod.Builder | None = None, trust: bool = False,
                       overwrite: bool = False) -> dict[str, Any]:
    """Write `out` (.safetensors, keys `<modality>.<torchvision name>`) with the normalisation
    JSON in its metadata (key "satfuse_normalization") and beside it; an existing one of them is
    replaced only with `overwrite` (`check_export_out`)."""
    out = Path(out)
    export_mod.check_export_out(export_mod.resolve_checkpoint(Path(ckpt_dir)), [out, normalization_path(out)], overwrite)
    sds, doc, summary = plain_backbones(ckpt_dir, builder, trust, "safetensors")
    flat = {f"{name}.{k}": v for name, sd in sds.items() for k, v in sd.items()}
    metadata = {"format": "satfuse-torchvision-backbones/1", "modalities": ",".join(sds),
                "satfuse_normalization": json.dumps({**doc, "weights": out.name}, default=str)}
    _write(out, safetensors_bytes(flat, metadata=metadata))
    norm = normalization_path(out)
    _write_json(norm, {**doc, "weights": out.name})
    log.info("exported %s (torchvision names) -> %s", ", ".join(sds), out)
    return {"out": str(out), "normalization": str(norm), "format": "safetensors", **summary,
            "bytes": out.stat().st_size}


def _write(out: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(out, data)
    except OSError as exc:
        raise SatfuseError(f"{out}: cannot write the export ({exc.strerror or exc}); choose another --out") from None


def export(ckpt_dir: Path, out: Path, fmt: str = "satfuse", builder: export_mod.Builder | None = None,
           trust: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """`satfuse ckpt export --format FMT`: dispatch to the writer of that format. Each writer
    refuses an output that exists (unless `overwrite`) or lies among the checkpoints read, so
    callers of a writer itself (the demo, fine-tuning from a checkpoint directory) are held to
    the same rule."""
    out = Path(out)
    if fmt == "satfuse":
        return export_mod.export_backbones(ckpt_dir, out, builder=builder, trust=trust, overwrite=overwrite)
    if fmt in ("torchvision", "timm"):
        return export_torchvision(ckpt_dir, out, builder, trust, overwrite, fmt)
    if fmt == "safetensors":
        return export_safetensors(ckpt_dir, out, builder, trust, overwrite)
    raise SatfuseError(f"--format {fmt!r}: unknown; choose one of {', '.join(FORMATS)}")
