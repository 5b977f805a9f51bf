"""Projection heads that map pooled (or per-location) features into the contrastive space."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """Linear - ReLU - Linear, as the authors (2048-2048-128 on ResNet-50).

    No BatchNorm on purpose: BN statistics would be per rank (the local batch), which makes
    the result depend on how the global batch is split, and the loss is a global-batch one.
    """

    def __init__(self, in_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
        )
        self.out_dim = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DenseProjectionHead(nn.Module):
    """The same head applied at every location of a feature map (1x1 convs), for MMA."""

    def __init__(self, in_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out, 1)
        )
        self.out_dim = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
