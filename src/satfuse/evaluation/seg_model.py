"""Segmentation models: the classifier's branches (backbones, inputs, weights) with a dense decoder
instead of the pooled Linear head.

Why built from a `Classifier`: pretrained and from-scratch models, early and late fusion, the
plain-weights and checkpoint loaders are the classification path's (`finetune.build_model`), so
a segmentation comparison differs from the classification one only in the head. Late fusion
(S1+S2, one backbone per modality) concatenates both backbones' maps per scale before the
decoder; early fusion is one backbone on the 15 stacked bands. `model.mode=linear` freezes the
backbones (BatchNorm in eval mode, as for linear probing) and trains only the decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from satfuse.evaluation.models import Classifier, select_input
from satfuse.models.backbones import pyramid_backbones
from satfuse.models.decoders import decoder_for
from satfuse.registry import DECODERS
from satfuse.utils import SatfuseError


class Segmenter(nn.Module):
    """Backbone pyramids (fused per scale) -> registered decoder -> (B, n_classes, H, W) logits."""

    def __init__(self, clf: Classifier, backbone: str, decoder: str, n_classes: int) -> None:
        super().__init__()
        for bb in clf.backbones:
            if not bb.pyramid_channels:
                raise SatfuseError(
                    f"model.backbone={backbone!r} has no multi-scale feature maps, which segmentation "
                    f"needs; use one of: {', '.join(pyramid_backbones()) or 'none registered'}")
        self.specs, self.backbones, self.frozen = clf.specs, clf.backbones, clf.frozen
        self.strides = tuple(clf.backbones[0].pyramid_strides)
        channels = tuple(sum(level) for level in zip(*(bb.pyramid_channels for bb in clf.backbones), strict=True))
        self.decoder_name = decoder_for(backbone, decoder)
        self.decoder = DECODERS.get(self.decoder_name)(channels, self.strides, n_classes)

    @property
    def max_stride(self) -> int:
        """The coarsest map's downsampling: an input side must be a multiple of it."""
        return max(self.strides)

    def train(self, mode: bool = True) -> Segmenter:
        """Frozen backbones stay in eval mode so BatchNorm keeps the pretrained statistics."""
        super().train(mode)
        if self.frozen:
            self.backbones.eval()
        return self

    def forward(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            pyramids = [bb.forward_pyramid(select_input(spec.input, s1, s2))
                        for spec, bb in zip(self.specs, self.backbones, strict=True)]
        maps = [torch.cat(level, dim=1) for level in zip(*pyramids, strict=True)]
        return self.decoder(maps, tuple(s1.shape[-2:]))

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
        """Decoder at `lr` (train.lr, the head's), backbones at `backbone_lr` unless frozen."""
        groups = [{"params": list(self.decoder.parameters()), "lr": lr, "weight_decay": weight_decay,
                   "name": "decoder"}]
        bb = [p for p in self.backbones.parameters() if p.requires_grad]
        if bb:
            groups.append({"params": bb, "lr": backbone_lr, "weight_decay": weight_decay, "name": "backbone"})
        return groups


def check_crop(crop: int, patch: int, stride: int, backbone: str) -> int:
    """The side the model sees (`crop`, or the whole `patch` for crop 0), refused unless the
    decoder's coarsest stride tiles it, naming the valid crops."""
    side = crop or patch
    if side % stride == 0:
        return side
    valid = list(range(stride, patch + 1, stride))
    shown = ", ".join(str(v) for v in valid[-8:]) if valid else "none"
    raise SatfuseError(
        f"data.crop={crop}{f' (whole {patch}px patch)' if not crop else ''} cannot be tiled by "
        f"{backbone}'s coarsest map (stride {stride}); use a multiple of {stride} up to {patch}: {shown}")
