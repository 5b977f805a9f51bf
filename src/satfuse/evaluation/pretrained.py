"""Pretrained backbones for fine-tuning: exported files or checkpoint directories.

Why go through the export format even for a checkpoint directory: the export
(`satfuse ckpt export`, `satfuse.checkpoint.export.export_backbones`) is the one place that
knows DDP/DCP vs DeepSpeed layouts; fine-tuning only ever reads
`{"format": "satfuse-backbones/1", "backbone", "in_channels", "state_dicts", "normalization", ...}`
with `torch.load(weights_only=True)` (no pickle of arbitrary objects).

Every mismatch with the fine-tuning config is one SatfuseError that lists what differs.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from satfuse.checkpoint.export import export_backbones, resolve_checkpoint
from satfuse.checkpoint.trust import foreign_owner
from satfuse.data.packing.normalize import BandStats
from satfuse.evaluation.models import CHANNELS_TO_INPUT, INPUT_CHANNELS, BranchSpec
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

EXPORT_FORMAT = "satfuse-backbones/1"


@dataclass
class PretrainedBackbones:
    """The content of an export file, checked."""

    method: str
    backbone: str
    in_channels: dict[str, int]
    state_dicts: dict[str, dict]
    normalization: dict | None
    step: int
    source: str
    path: str
    adapted: list[str] = field(default_factory=list)  # how plain weights were made to fit (e.g. pos_embed resampled)

    def band_stats(self) -> dict[str, BandStats] | None:
        """Pretraining normalisation per sensor, so fine-tuning inputs match pretraining."""
        if not self.normalization:
            return None
        try:
            return {s: BandStats(tuple(float(v) for v in n["mean"]), tuple(float(v) for v in n["std"]),
                                 (float(n["clip"][0]), float(n["clip"][1])))
                    for s, n in self.normalization.items() if s in ("s1", "s2")}
        except (KeyError, TypeError, IndexError) as exc:
            raise SatfuseError(f"{self.path}: 'normalization' is malformed ({exc}); re-export the "
                               "checkpoint with `satfuse ckpt export`") from exc


def load_pretrained(path: str | Path, trust: bool = False) -> PretrainedBackbones:
    """Read an export file, or export a checkpoint directory to a temp file first.

    Exports are the exchange format (tensors and JSON-like values, read weights_only); a
    checkpoint directory is read as data too (`satfuse.checkpoint.trust`: a file that is not
    is refused unless `trust`, i.e. --trust-checkpoint), with a warning when another user
    owns it."""
    p = Path(path)
    if not p.exists():
        raise SatfuseError(f"{p}: checkpoint not found; pass an exported backbones file "
                           "(`satfuse ckpt export`), a checkpoint directory, or `none`")
    if p.is_dir() or p.name == "latest":  # a step dir, `latest`, `checkpoints/` or a run dir
        return _from_checkpoint_dir(p, trust)
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable file, whatever the cause
        raise SatfuseError(f"{p}: not a loadable backbones export ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0][:200]}); export it with `satfuse ckpt export`") from exc
    return _check_export(raw, str(p))


def _from_checkpoint_dir(ckpt_dir: Path, trust: bool = False) -> PretrainedBackbones:
    ckpt_dir = resolve_checkpoint(ckpt_dir)  # the step dir, as `satfuse ckpt export` takes it
    owner = foreign_owner(ckpt_dir)
    if owner is not None:
        log.warning("%s: a checkpoint directory of another user (uid %d); checkpoint directories "
                    "are code to satfuse, exports are data: ask for `satfuse ckpt export` output "
                    "and pass that file as --checkpoint", ckpt_dir, owner)
    with tempfile.TemporaryDirectory(prefix="satfuse-export-") as tmp:
        out = Path(tmp) / "backbones.pt"
        log.info("exporting backbones of %s", ckpt_dir)
        export_backbones(ckpt_dir, out, trust=trust)
        raw = torch.load(out, map_location="cpu", weights_only=True)
    return _check_export(raw, str(ckpt_dir))


def _check_export(raw: object, where: str) -> PretrainedBackbones:
    if not isinstance(raw, dict) or raw.get("format") != EXPORT_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise SatfuseError(f"{where}: format {got!r} is not {EXPORT_FORMAT!r}; "
                           "export the checkpoint with `satfuse ckpt export`")
    missing = [k for k in ("backbone", "in_channels", "state_dicts") if k not in raw]
    if missing:
        raise SatfuseError(f"{where}: export lacks {', '.join(missing)}; re-export it")
    if set(raw["in_channels"]) != set(raw["state_dicts"]):
        raise SatfuseError(f"{where}: in_channels names {sorted(raw['in_channels'])} differ from "
                           f"state_dicts names {sorted(raw['state_dicts'])}; re-export it")
    return PretrainedBackbones(
        method=str(raw.get("method", "unknown")), backbone=str(raw["backbone"]),
        in_channels={k: int(v) for k, v in raw["in_channels"].items()},
        state_dicts=dict(raw["state_dicts"]), normalization=raw.get("normalization"),
        step=int(raw.get("step", -1)), source=str(raw.get("source", where)), path=where,
    )


def _branch_input(name: str, channels: int) -> str:
    """Which input a pretrained backbone reads: by modality name, else by channel count."""
    if name in INPUT_CHANNELS:
        return name
    if channels in CHANNELS_TO_INPUT:
        return CHANNELS_TO_INPUT[channels]
    raise SatfuseError(f"backbone '{name}' takes {channels} channels, which no input provides "
                       f"(known: {INPUT_CHANNELS})")


def pretrained_branches(pre: PretrainedBackbones, backbone: str, modalities: str,
                        fusion: str) -> list[BranchSpec]:
    """Branches that a pretrained export gives for the requested modalities, or a SatfuseError."""
    problems = []
    if pre.backbone != backbone:
        problems.append(f"backbone: checkpoint {pre.backbone!r} vs config model.backbone={backbone!r}")
    specs = []
    for name, ch in pre.in_channels.items():
        inp = _branch_input(name, ch)
        if ch != INPUT_CHANNELS[inp]:
            problems.append(f"in_channels[{name}]: checkpoint {ch} vs {INPUT_CHANNELS[inp]} for {inp}")
        specs.append(BranchSpec(name, inp))
    if problems:
        raise SatfuseError(f"{pre.path}: checkpoint does not match the fine-tuning config: "
                           + "; ".join(problems) + " (fix model.backbone or pass the right checkpoint)")
    wanted = _wanted(specs, modalities, fusion)
    if not wanted:
        have = ", ".join(f"{s.name}:{s.input}" for s in specs)
        raise SatfuseError(f"{pre.path}: no pretrained backbone for modalities={modalities} "
                           f"fusion={fusion} (checkpoint has {have}); choose modalities it covers")
    return wanted


def _wanted(specs: list[BranchSpec], modalities: str, fusion: str) -> list[BranchSpec]:
    by_input = {s.input: s for s in specs}
    if modalities == "s1":
        return [by_input["s1"]] if "s1" in by_input else []
    if modalities == "s2":
        for inp in ("s2", "s2_rgb"):
            if inp in by_input:
                return [by_input[inp]]
        return []
    if "s1s2" in by_input and (fusion == "early" or not {"s1", "s2"} <= set(by_input)):
        return [by_input["s1s2"]]
    if fusion == "late" and {"s1", "s2"} <= set(by_input):
        return [by_input["s1"], by_input["s2"]]
    return []
