"""Downstream classifiers: backbone(s) + one Linear head, as the authors evaluate.

Why one module for every method: the comparison in the paper is only fair if the pretrained
models and the supervised baselines share the head, the optimiser and the data; the only
differences are where the backbone weights come from and which inputs each backbone sees.

A classifier is a list of *branches*; each branch is one backbone fed one input:
`s1` (2 ch), `s2` (13 ch), `s2_rgb` (B4,B3,B2) or `s1s2` (15 ch stacked = early fusion).
Late fusion = two branches whose pooled features are concatenated before the head.
Linear probing freezes every backbone and keeps it in eval mode (BatchNorm statistics are
the pretrained ones, not re-estimated on the few labels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from satfuse.data.packing.normalize import S2_RGB
from satfuse.models.backbones import build_backbone
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

INPUT_CHANNELS = {"s1": 2, "s2": 13, "s2_rgb": 3, "s1s2": 15}
CHANNELS_TO_INPUT = {v: k for k, v in INPUT_CHANNELS.items()}


@dataclass(frozen=True)
class BranchSpec:
    """One backbone: a name (the state-dict key when pretrained) and the input it reads."""

    name: str
    input: str

    @property
    def in_channels(self) -> int:
        return INPUT_CHANNELS[self.input]


def select_input(kind: str, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """The tensor a branch reads, from the normalised S1 (B,2,H,W) and S2 (B,13,H,W) batch."""
    if kind == "s1":
        return s1
    if kind == "s2":
        return s2
    if kind == "s2_rgb":
        return s2[:, S2_RGB]
    if kind == "s1s2":
        return torch.cat([s1, s2], dim=1)
    raise ValueError(f"unknown branch input {kind!r}")


def scratch_branches(modalities: str, fusion: str) -> list[BranchSpec]:
    """The supervised baselines: S1 only, S2 only, early fusion (one 15-ch backbone), late fusion."""
    if modalities in ("s1", "s2"):
        return [BranchSpec(modalities, modalities)]
    if fusion == "early":
        return [BranchSpec("s1s2", "s1s2")]
    return [BranchSpec("s1", "s1"), BranchSpec("s2", "s2")]


class Classifier(nn.Module):
    """Branches' pooled features, concatenated, -> Linear(n_classes)."""

    def __init__(self, specs: list[BranchSpec], backbones: list[nn.Module], n_classes: int,
                 frozen: bool = False) -> None:
        super().__init__()
        self.specs = list(specs)
        self.backbones = nn.ModuleList(backbones)
        self.frozen = frozen
        feat_dim = sum(int(b.out_dim) for b in backbones)
        self.head = nn.Linear(feat_dim, n_classes)
        self.weight_notes: list[str] = []  # how pretrained weights were adapted (build_classifier)
        if frozen:
            for p in self.backbones.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        """Frozen backbones stay in eval mode so BatchNorm keeps the pretrained statistics."""
        super().train(mode)
        if self.frozen:
            self.backbones.eval()
        return self

    def features(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        feats = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            for spec, bb in zip(self.specs, self.backbones, strict=True):
                feats.append(bb(select_input(spec.input, s1, s2)))
        return torch.cat(feats, dim=1)

    def forward(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(s1, s2))

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
        """Separate backbone / head learning rates (the authors' fine-tuning set-up)."""
        groups = [{"params": list(self.head.parameters()), "lr": lr, "weight_decay": weight_decay,
                   "name": "head"}]
        bb = [p for p in self.backbones.parameters() if p.requires_grad]
        if bb:
            groups.append({"params": bb, "lr": backbone_lr, "weight_decay": weight_decay,
                           "name": "backbone"})
        return groups


def first_mismatch(got: dict, want: dict) -> str:
    """The first tensor that keeps `got` from loading into a module with state dict `want`,
    named with both shapes ("" if none)."""
    for k, v in want.items():
        if k not in got:
            return f"{k} {tuple(v.shape)} missing in the checkpoint"
        if tuple(got[k].shape) != tuple(v.shape):
            return f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(v.shape)}"
    extra = sorted(set(got) - set(want))
    return f"unexpected {extra[0]} {tuple(got[extra[0]].shape)} in the checkpoint" if extra else ""


def build_classifier(specs: list[BranchSpec], backbone: str, n_classes: int, frozen: bool,
                     state_dicts: dict[str, dict] | None = None, source: str = "",
                     img_size: int | None = None) -> Classifier:
    """Build each branch's backbone for crops of `img_size` (random init, or the pretrained
    weights under spec.name, adapted by `Backbone.adapt_state_dict`: e.g. a ViT's position
    embeddings resampled to this crop's grid, noted in `Classifier.weight_notes`)."""
    modules, notes = [], []
    for spec in specs:
        bb = build_backbone(backbone, spec.in_channels, img_size=img_size)
        if state_dicts is not None:
            sd, adapted = bb.adapt_state_dict(state_dicts[spec.name])
            notes += [f"{spec.name}: {n}" for n in adapted]
            try:
                bb.load_state_dict(sd, strict=True)
            except RuntimeError as exc:
                first = (first_mismatch(sd, bb.state_dict())
                         or str(exc).strip().splitlines()[0])
                raise SatfuseError(
                    f"{source}: backbone '{spec.name}' weights do not fit a {backbone} with "
                    f"{spec.in_channels} input channels ({first}); set model.backbone to the "
                    "checkpoint's backbone") from exc
        modules.append(bb)
    model = Classifier(specs, modules, n_classes, frozen=frozen)
    model.weight_notes = notes
    return model
