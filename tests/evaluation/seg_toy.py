"""Small backbones for the segmentation tests: one with the multi-scale contract
(`pyramid_channels`, `pyramid_strides`, `forward_pyramid`), one without it.

They join `BACKBONES` only inside `registered()` (the tests' module fixture) or after
`register()` (a subprocess): registered at import, collecting this file would add them to every
name list the rest of the session checks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from satfuse.models.backbones import Backbone
from satfuse.registry import BACKBONES


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


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


class SegFlat(Backbone):
    """A backbone with a single map and no pyramid: segmentation must refuse it by name."""

    feature_dim = 8
    input_weight = "conv.weight"

    def __init__(self, in_channels: int, zero_init_residual: bool = False) -> None:
        super().__init__(in_channels, zero_init_residual)
        self.conv = nn.Conv2d(in_channels, 8, 3, stride=4, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


TOYS = {"seg_toy": SegToy, "seg_flat": SegFlat}


def register() -> None:
    """Register the toys for good (a subprocess entry point)."""
    for name, cls in TOYS.items():
        BACKBONES.register(name, cls)


@contextmanager
def registered() -> Iterator[None]:
    """The toys registered for the duration of the block, then removed again."""
    register()
    try:
        yield
    finally:
        for name in TOYS:
            BACKBONES._entries.pop(name, None)  # test-only: no public unregister on purpose
