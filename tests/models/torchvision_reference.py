"""torchvision's ResNet, as its published definition (torchvision/models/resnet.py) lays it out.

torchvision cannot be installed beside the CPU torch wheel used here, so the export tests
check against this: the parameter/buffer names and shapes that definition produces, and an
independent module with that structure (written here from the definition, not from
satfuse's backbone) that the exported tensors must load into with `strict=True`.

The definition, for the record: `conv1` 7x7/2 (3 in, 64 out, no bias), `bn1`, `relu`,
`maxpool` 3x3/2; `layer1..4` of BasicBlock (resnet18: [2,2,2,2]) or Bottleneck (resnet50:
[3,4,6,3], planes 64/128/256/512, expansion 4, stride on `conv2`), each first block with a
`downsample = Sequential(conv1x1(stride), BatchNorm)` when the shape changes; `avgpool`;
`fc` Linear(512 * expansion, 1000). Every BatchNorm has weight, bias, running_mean,
running_var and num_batches_tracked.
"""

from __future__ import annotations

import torch
from torch import nn

ARCH = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet50": ("bottleneck", [3, 4, 6, 3])}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.{k}", () if k == "num_batches_tracked" else (c,)) for k in BN_KEYS]


def expected_shapes(arch: str, in_channels: int = 3, with_fc: bool = False) -> dict[str, tuple[int, ...]]:
    """{name: shape} of torchvision.models.<arch>() with conv1 taking `in_channels` bands."""
    kind, layers = ARCH[arch]
    out: list[tuple[str, tuple[int, ...]]] = [("conv1.weight", (64, in_channels, 7, 7)), *_bn("bn1", 64)]
    inplanes = 64
    expansion = 4 if kind == "bottleneck" else 1
    for i, (blocks, planes) in enumerate(zip(layers, [64, 128, 256, 512], strict=True)):
        stride = 1 if i == 0 else 2
        for j in range(blocks):
            p = f"layer{i + 1}.{j}"
            if kind == "bottleneck":
                out += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1)), *_bn(f"{p}.bn1", planes),
                        (f"{p}.conv2.weight", (planes, planes, 3, 3)), *_bn(f"{p}.bn2", planes),
                        (f"{p}.conv3.weight", (planes * 4, planes, 1, 1)), *_bn(f"{p}.bn3", planes * 4)]
            else:
                out += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3)), *_bn(f"{p}.bn1", planes),
                        (f"{p}.conv2.weight", (planes, planes, 3, 3)), *_bn(f"{p}.bn2", planes)]
            if j == 0 and (stride != 1 or inplanes != planes * expansion):
                out += [(f"{p}.downsample.0.weight", (planes * expansion, inplanes, 1, 1)),
                        *_bn(f"{p}.downsample.1", planes * expansion)]
            inplanes = planes * expansion
    if with_fc:
        out += [("fc.weight", (1000, 512 * expansion)), ("fc.bias", (1000,))]
    return dict(out)


class _Block(nn.Module):
    def __init__(self, kind: str, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.kind = kind
        if kind == "bottleneck":
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
        else:
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.kind == "bottleneck":
            out = self.bn3(self.conv3(self.relu(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ReferenceResNet(nn.Module):
    """torchvision's ResNet layout (names, strides, forward); `fc` is nn.Identity, as a
    feature extractor built from torchvision would have it."""

    def __init__(self, arch: str, in_channels: int = 3) -> None:
        super().__init__()
        kind, layers = ARCH[arch]
        expansion = 4 if kind == "bottleneck" else 1
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (blocks, planes) in enumerate(zip(layers, [64, 128, 256, 512], strict=True)):
            stride = 1 if i == 0 else 2
            mods = []
            for j in range(blocks):
                ds = None
                if j == 0 and (stride != 1 or inplanes != planes * expansion):
                    ds = nn.Sequential(nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * expansion))
                mods.append(_Block(kind, inplanes, planes, stride if j == 0 else 1, ds))
                inplanes = planes * expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
