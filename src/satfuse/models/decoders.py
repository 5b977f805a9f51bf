"""Dense decoders over a backbone's multi-scale maps: per-pixel logits for land-cover segmentation.

Why a contract of their own: a decoder reads only what the backbone contract declares
(`pyramid_channels`, `pyramid_strides`, the maps of `forward_pyramid`, finest first), so any
registered backbone that provides multi-scale maps can be segmented, and a new decoder is one
registered class (`satfuse.registry.DECODERS`, chosen by `model.decoder`).

Built-ins, after the seed authors' follow-up (Scheibenreif et al., CVPR EarthVision 2022):

- `unet` — a U-Net-style decoder (Ronneberger et al. 2015) over a ResNet's stages, what the
  follow-up pairs with ResNet-50: from the coarsest map up, upsample to the next finer map,
  concatenate it (skip connection), two 3x3 conv-BN-ReLU; then upsample to the input.
- `upernet` — a UPerNet-style decoder (Xiao et al. 2018) for transformer pyramids (Swin-T): a
  pyramid-pooling module on the coarsest map, an FPN top-down path, every level upsampled to
  the finest and fused. The follow-up's Swin-Unet decodes with Swin blocks and patch expanding;
  this convolutional decoder keeps its skip structure (every stage feeds the output) without
  the transformer blocks, so it is "Swin-UNet/UPerNet-style", not Swin-Unet's exact decoder.

`model.decoder=auto` picks the follow-up's pairing (`AUTHORS_DECODER`, else `unet`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from satfuse.registry import DECODERS

AUTHORS_DECODER = {"swin_tiny_patch4_window7": "upernet"}  # backbone -> the follow-up's decoder; others: unet
DEFAULT_DECODER = "unet"


def decoder_for(backbone: str, decoder: str) -> str:
    """The decoder name `model.decoder` means for `backbone` ("auto": the follow-up's pairing)."""
    if decoder != "auto":
        return decoder
    return AUTHORS_DECODER.get(backbone, DEFAULT_DECODER)


class Decoder(nn.Module):
    """What a decoder provides. Subclass it and register the class with
    `@DECODERS.register("name")`; the registered class is the builder:
    `cls(channels, strides, n_classes)` with the (fused) pyramid's channels and strides, finest
    first. `forward(maps, size)` takes one map per level and returns (B, n_classes, *size)
    logits at the input resolution."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], n_classes: int) -> None:
        super().__init__()
        self.channels, self.strides, self.n_classes = tuple(channels), tuple(strides), n_classes

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """The decoders' building block: conv (no bias, BN follows), BN, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _up(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@DECODERS.register("unet")
class UNetDecoder(Decoder):
    """U-Net-style: coarsest map -> (upsample, concat skip, 2 x conv-BN-ReLU) per finer level ->
    upsample to the input -> 1x1 classifier. Widths follow the skips (capped at 256, at least 16)."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], n_classes: int) -> None:
        super().__init__(channels, strides, n_classes)
        widths = [max(16, min(256, c)) for c in self.channels]
        self.bottom = conv_bn_relu(self.channels[-1], widths[-1], 1)
        self.blocks = nn.ModuleList()
        for level in range(len(self.channels) - 2, -1, -1):  # coarse to fine
            cin = widths[level + 1] + self.channels[level]
            self.blocks.append(nn.Sequential(conv_bn_relu(cin, widths[level]),
                                             conv_bn_relu(widths[level], widths[level])))
        self.classifier = nn.Conv2d(widths[0], n_classes, 1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.bottom(maps[-1])
        for block, skip in zip(self.blocks, reversed(maps[:-1]), strict=True):
            x = block(torch.cat([_up(x, skip.shape[-2:]), skip], dim=1))
        return _up(self.classifier(x), size)


@DECODERS.register("upernet")
class UPerNetDecoder(Decoder):
    """UPerNet-style: pyramid pooling (1, 2, 3, 6 bins) on the coarsest map, FPN top-down over
    every level, all levels upsampled to the finest and fused by a 3x3 conv, 1x1 classifier."""

    BINS = (1, 2, 3, 6)

    def __init__(self, channels: Sequence[int], strides: Sequence[int], n_classes: int,
                 width: int = 128) -> None:
        super().__init__(channels, strides, n_classes)
        top = self.channels[-1]
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(top, width, 1))
                                 for b in self.BINS)
        self.ppm_out = conv_bn_relu(top + width * len(self.BINS), width)
        self.lateral = nn.ModuleList(conv_bn_relu(c, width, 1) for c in self.channels[:-1])
        self.smooth = nn.ModuleList(conv_bn_relu(width, width) for _ in self.channels[:-1])
        self.fuse = conv_bn_relu(width * len(self.channels), width)
        self.classifier = nn.Conv2d(width, n_classes, 1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        top = maps[-1]
        pooled = [_up(p(top), top.shape[-2:]) for p in self.ppm]
        levels = [self.ppm_out(torch.cat([top, *pooled], dim=1))]
        for i in range(len(maps) - 2, -1, -1):  # FPN top-down
            lat = self.lateral[i](maps[i]) + _up(levels[0], maps[i].shape[-2:])
            levels.insert(0, self.smooth[i](lat))
        finest = levels[0].shape[-2:]
        fused = self.fuse(torch.cat([levels[0], *(_up(x, finest) for x in levels[1:])], dim=1))
        return _up(self.classifier(fused), size)
