"""Small backbones for the segmentation tests: one with the multi-scale contract
(`pyramid_channels`, `pyramid_strides`, `forward_pyramid`), one without it."""

from __future__ import annotations

import torch
from torch import nn

from satfuse.models.backbones import Backbone
from satfuse.registry import BACKBONES


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


@BACKBONES.register("seg_toy")
class SegToy(Backbone):
    """Three stride-2 stages: maps at strides 2, 4, 8 with 8, 16, 24 channels."""

    feature_dim = 24
    input_weight = "stages.0.0.weight"
    pyramid_channels = (8, 16, 24)
    pyramid_strides = (2, 4, 8)

    def __init__(self, in_channels: int, zero_init_residual: bool = False) -> None:
        super().__init__(in_channels, zero_init_residual)
        chans = (in_channels, *self.pyramid_channels)
        self.stages = nn.ModuleList(_stage(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True))

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pyramid(x)[-1]


@BACKBONES.register("seg_flat")
class SegFlat(Backbone):
    """A backbone with a single map and no pyramid: segmentation must refuse it by name."""

    feature_dim = 8
    input_weight = "conv.weight"

    def __init__(self, in_channels: int, zero_init_residual: bool = False) -> None:
        super().__init__(in_channels, zero_init_residual)
        self.conv = nn.Conv2d(in_channels, 8, 3, stride=4, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
