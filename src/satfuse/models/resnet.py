"""The built-in ResNets: torchvision's ResNet-18/50 with any number of input bands, and a tiny
ResNet built from torchvision's blocks, registered as `resnet18`, `resnet50` and `tiny`.

Why torchvision: the authors' backbones differ from the stock ones only in `conv1` (2 channels
for S1, 13 for S2, 15 for early fusion), so satfuse builds `torchvision.models.resnet18/50`,
swaps `conv1` and drops `fc`. The module names are torchvision's (conv1, bn1, relu, maxpool,
layer1..4, avgpool), so a satfuse ResNet-18/50 state dict is a torchvision one (fc aside) and
exports as torchvision (and safetensors) weights; checkpoints written before satfuse used
torchvision (its own copy of the same layout) load unchanged.

`tiny` is for tests and the CPU demo: a 3x3 stride-2 stem without max-pool and one
torchvision BasicBlock per stage (16-32-64-128), so a 64x64 crop leaves a 4x4 map (MMA needs
a spatial map with more than one location) and a step costs milliseconds on 2 cores.

Multi-scale maps (`forward_pyramid`) are the outputs of layer1..4; activation checkpointing
(`set_grad_checkpointing`) recomputes each stage in the backward pass (torch.utils.checkpoint,
non-reentrant) with BatchNorm's running statistics updated once per step, as without it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock, Bottleneck

from satfuse.models.backbones import EXPORT_FORMATS, Backbone
from satfuse.models.legacy import upgrade_key
from satfuse.registry import BACKBONES


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
    torchvision_arch: ClassVar[str] = ""  # torchvision.models builder; "" = built here from its blocks
    input_weight = "conv1.weight"

    def __init__(self, in_channels: int, zero_init_residual: bool = False, img_size: int | None = None) -> None:
        """`img_size` is accepted for the common builder and ignored: a ResNet takes any crop."""
        super().__init__(in_channels, zero_init_residual)
        # torchvision's names (conv1, bn1, relu, maxpool, layer1..4, avgpool), so a satfuse
        # ResNet-18/50 state dict is a torchvision one (fc aside); checkpoints written with
        # the old `stem.0`/`stem.1` names are renamed on load (satfuse.models.legacy).
        if self.torchvision_arch:
            tv = getattr(torchvision.models, self.torchvision_arch)(weights=None, zero_init_residual=zero_init_residual)
            conv1 = nn.Conv2d(in_channels, self.widths[0], 7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
            self.conv1, self.bn1, self.relu, self.maxpool = conv1, tv.bn1, tv.relu, tv.maxpool
            self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        else:
            self.conv1 = nn.Conv2d(in_channels, self.widths[0], 3, stride=2, padding=1, bias=False)
            self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(self.widths[0]), nn.ReLU(inplace=True), nn.Identity()
            cin, stages = self.widths[0], []
            for i, (blocks, width) in enumerate(zip(self.layers, self.widths, strict=True)):
                stage, cin = _make_stage(self.block, cin, width, blocks, stride=1 if i == 0 else 2)
                stages.append(stage)
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            _init_weights(self, zero_init_residual)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = self.widths[3] * self.block.expansion
        self.pyramid_channels = tuple(w * self.block.expansion for w in self.widths)
        first = 4 if self.stem_kind == "imagenet" else 2
        self.pyramid_strides = tuple(first * 2 ** i for i in range(4))
        self._grad_checkpointing = False
        self._register_load_state_dict_pre_hook(_upgrade_legacy_keys)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of layer1..layer4 (strides 4/8/16/32; `tiny`: 2/4/8/16)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = _checkpointed(stage, x) if self._grad_checkpointing and torch.is_grad_enabled() else stage(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pyramid(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each of the four stages in the backward pass (the stem is cheap to keep)."""
        self._grad_checkpointing = bool(enable)

    @classmethod
    def library_layout(cls, state_dict: Mapping[str, torch.Tensor], img_size: int | None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """torchvision's names already (timm's resnet18/50 share them): the state dict as is."""
        arch = cls.torchvision_arch or "resnet"
        return dict(state_dict), {
            "architecture": f"torchvision.models.{arch}",
            "load": f"torchvision.models.{arch}() or timm.create_model('{arch}', num_classes=0)",
            "conv1": f"replace conv1 with nn.Conv2d(in_channels, {cls.widths[0]}, 7, 2, 3, bias=False) before loading"}

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
    torchvision_arch = "resnet18"


@BACKBONES.register("resnet50")
class ResNet50(ResNet):
    """torchvision's resnet50 trunk (Bottleneck, 3-4-6-3): the authors' backbone."""

    block, layers, feature_dim, export_formats = Bottleneck, (3, 4, 6, 3), 2048, frozenset(EXPORT_FORMATS)
    torchvision_arch = "resnet50"


def _checkpointed(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`stage(x)` without keeping its activations: recomputed in the backward pass. The
    recomputation runs BatchNorm with its running statistics frozen, so they move once per
    step as without checkpointing (the outputs use the batch statistics either way)."""
    calls = [0]

    def run(inp: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return stage(inp)
        with _frozen_bn_stats(stage):
            return stage(inp)

    return checkpoint(run, x, use_reentrant=False)


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers under `module` run without updating running_mean/var or the count."""
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


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


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck], cin: int, width: int, blocks: int, stride: int
) -> tuple[nn.Sequential, int]:
    cout = width * block.expansion
    down = None if stride == 1 and cin == cout else nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))  # torchvision's option B
    mods = [block(cin, width, stride, down)]
    cin = cout
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
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


