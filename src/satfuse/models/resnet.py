"""The built-in backbones: ResNet-18/50 with any number of input channels and a tiny ResNet,
written here (no torchvision), registered as `resnet18`, `resnet50` and `tiny`.

Why our own: torchvision does not install beside the CPU torch wheel used here, and the
authors' backbones differ from the stock ones only in `conv1` (2 channels for S1, 13 for S2,
15 for early fusion). The layout follows torchvision exactly (BasicBlock/Bottleneck, 7x7
stride-2 stem, max-pool, four stages, stride on the 3x3 conv of a Bottleneck: "ResNet v1.5")
so the parameter count and the feature sizes match what the paper's numbers assume, and the
ResNet-18/50 state dicts export as torchvision (and safetensors) weights.

`tiny` is for tests and the CPU demo: a 3x3 stride-2 stem without max-pool and one
BasicBlock per stage (16-32-64-128), so a 64x64 crop leaves a 4x4 map (MMA needs a spatial
map with more than one location) and a step costs milliseconds on 2 cores.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from satfuse.models.backbones import EXPORT_FORMATS, Backbone
from satfuse.models.legacy import upgrade_key
from satfuse.registry import BACKBONES


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (strided) - 1x1 with 4x expansion (ResNet-50)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """Projection shortcut when the shape changes (torchvision's option B)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class ResNet(Backbone):
    """A ResNet trunk: stem, four stages, global average pool (no classifier).

    forward(x) -> (B, out_dim) pooled features; forward_features(x) -> (B, out_dim, H', W')
    the last spatial map (MMA and dense tasks). The registered subclasses below fix the
    block, depth and widths; the class itself is not a registered backbone.
    """

    block: ClassVar[type[BasicBlock] | type[Bottleneck]]
    layers: ClassVar[tuple[int, int, int, int]]
    widths: ClassVar[tuple[int, int, int, int]] = (64, 128, 256, 512)
    stem_kind: ClassVar[str] = "imagenet"  # not `stem`: old checkpoints named a module so
    input_weight = "conv1.weight"

    def __init__(self, in_channels: int, zero_init_residual: bool = False) -> None:
        super().__init__(in_channels, zero_init_residual)
        # torchvision's names (conv1, bn1, relu, maxpool, layer1..4, avgpool), so a satfuse
        # ResNet-18/50 state dict is a torchvision one (fc aside); checkpoints written with
        # the old `stem.0`/`stem.1` names are renamed on load (satfuse.models.legacy).
        self.conv1, self.bn1, self.relu, self.maxpool = _make_stem(self.stem_kind, in_channels, self.widths[0])
        cin = self.widths[0]
        stages = []
        for i, (blocks, width) in enumerate(zip(self.layers, self.widths, strict=True)):
            stage, cin = _make_stage(self.block, cin, width, blocks, stride=1 if i == 0 else 2)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = cin
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _init_weights(self, zero_init_residual)
        self._register_load_state_dict_pre_hook(_upgrade_legacy_keys)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)

    @classmethod
    def owns_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Read from the tensor names alone (blocks per stage, Bottleneck or not, a 7x7 conv1),
        without building a model: the same test torchvision's names allow."""
        return _structure(state_dict) == (cls.block is Bottleneck, list(cls.layers), cls.stem_kind == "imagenet")


@BACKBONES.register("tiny")
class TinyResNet(ResNet):
    """One BasicBlock per stage, 16-32-64-128, a 3x3 stride-2 stem (tests and the CPU demo)."""

    block, layers, widths, stem_kind, feature_dim = BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), "tiny", 128


@BACKBONES.register("resnet18")
class ResNet18(ResNet):
    """torchvision's resnet18 trunk (BasicBlock, 2-2-2-2)."""

    block, layers, feature_dim, export_formats = BasicBlock, (2, 2, 2, 2), 512, frozenset(EXPORT_FORMATS)


@BACKBONES.register("resnet50")
class ResNet50(ResNet):
    """torchvision's resnet50 trunk (Bottleneck, 3-4-6-3): the authors' backbone."""

    block, layers, feature_dim, export_formats = Bottleneck, (3, 4, 6, 3), 2048, frozenset(EXPORT_FORMATS)


def _structure(sd: Mapping[str, torch.Tensor]) -> tuple[bool, list[int], bool]:
    """(Bottleneck blocks?, blocks per stage, 7x7 conv1?) of a torchvision-named state dict."""
    blocks: dict[int, set[int]] = {}
    for k in sd:
        m = re.match(r"layer(\d)\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    w = sd.get("conv1.weight")
    k7 = isinstance(w, torch.Tensor) and w.dim() == 4 and w.shape[-1] == 7
    return (any(k.endswith(".conv3.weight") for k in sd), [len(blocks.get(i, ())) for i in (1, 2, 3, 4)], k7)


def describe_resnet(sd: Mapping[str, torch.Tensor]) -> str:
    """'Bottleneck ResNet with blocks [3, 4, 5, 3]': what an unregistered ResNet-like state dict is."""
    bottleneck, layers, _ = _structure(sd)
    return f"{'Bottleneck' if bottleneck else 'BasicBlock'} ResNet with blocks {layers}"


def _upgrade_legacy_keys(state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: rename old `stem.0.*`/`stem.1.*` keys in place."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + upgrade_key(key[len(prefix):])
        if new != key and new not in state_dict:
            state_dict[new] = state_dict.pop(key)


def _make_stem(
    kind: str, in_channels: int, width: int
) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Module]:
    """'imagenet': 7x7/2 conv + 3x3/2 max-pool (stride 4); 'tiny': 3x3/2 conv (stride 2)."""
    if kind == "tiny":
        return _conv3x3(in_channels, width, 2), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.Identity()
    return (
        nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck], cin: int, width: int, blocks: int, stride: int
) -> tuple[nn.Sequential, int]:
    mods = [block(cin, width, stride)]
    cin = width * block.expansion
    mods += [block(cin, width) for _ in range(blocks - 1)]
    return nn.Sequential(*mods), cin


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """torchvision's initialisation: He-normal (fan_out) convs, BN gamma 1 / beta 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:  # each residual branch starts as identity (Goyal et al. 2017)
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_bn().weight)


