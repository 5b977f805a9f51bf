"""The backbone contract, and building a registered backbone by name.

Every trunk satfuse pretrains or fine-tunes is a `Backbone` registered in
`satfuse.registry.BACKBONES` under the name users give as `model.backbone`. Pretraining
methods, the fine-tuning classifier, the weight exports, the plain-weights loader and the
benchmarks only ever use the members below, so a new backbone (a ViT, a ConvNeXt) is one
module with one registered subclass; the built-in ResNets are in `satfuse.models.resnet`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from satfuse.registry import BACKBONES
from satfuse.utils import SatfuseError

EXPORT_FORMATS = ("torchvision", "timm", "safetensors")  # weight formats besides satfuse's own export


class Backbone(nn.Module):
    """What a backbone provides. Subclass it and register the class::

        @BACKBONES.register("my_net")
        class MyNet(Backbone):
            feature_dim = 384
            ...

    The registered class is the builder: `cls(in_channels, zero_init_residual=False)`, plus
    `img_size=<crop>` when its `__init__` takes that keyword (ViT/Swin size their position
    tables and windows from the crop; a ResNet takes any crop and may omit it).
    """

    feature_dim: ClassVar[int]
    """The feature size (`out_dim`) of every instance, known before one is built: benchmarks
    and heads size themselves from it without building a ResNet-50 to ask."""

    export_formats: ClassVar[frozenset[str]] = frozenset()
    """Weight formats besides satfuse's own export that this backbone's state dict is valid in
    (`torchvision`: the keys load with strict=True into the torchvision model of the same name;
    `timm`: they load with strict=True into `timm.create_model(NAME, in_chans=C, num_classes=0)`;
    `safetensors`: the same tensors in one safetensors file). Empty: `satfuse ckpt export`
    refuses those formats for it, naming the backbones that have them."""

    input_weight: ClassVar[str] = ""
    """The state-dict key of the first layer's weight, whose dim 1 is the input band count
    (e.g. "conv1.weight"): a plain single-modality state dict's modality is read from it.
    Empty: the modality of plain weights must be given (`model.checkpoint_modality`)."""

    in_channels: int
    """The input bands this instance takes (dim 1 of its input): 2 for S1, 13 for S2, their sum
    for early fusion, or a manifest's band count."""

    out_dim: int
    """The size of `forward`'s pooled features and the channels of `forward_features`'s map
    (always equal to `feature_dim`); projection and classifier heads are built on it."""

    def __init__(self, in_channels: int, zero_init_residual: bool = False) -> None:
        """Build the trunk for `in_channels` bands. `zero_init_residual`: each residual branch
        starts as the identity (Goyal et al. 2017); a backbone without residual branches ignores it."""
        super().__init__()
        self.in_channels = in_channels
        self.out_dim = self.feature_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_dim, H', W'): the last spatial feature map. MMA aligns
        its locations across modalities, so H' x W' must keep more than one location at the
        pretraining crop; dense downstream tasks would read it too."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_dim): the pooled features contrastive heads and
        classifiers use (by default the spatial mean of `forward_features`)."""
        return self.forward_features(x).mean(dim=(2, 3))

    pyramid_channels: tuple[int, ...] = ()
    """Channels of each map `forward_pyramid` returns, finest first (e.g. (256, 512, 1024, 2048)
    for a ResNet-50). Empty: this backbone has no multi-scale features, and dense decoders
    (segmentation) refuse it, naming the backbones that have them. Set per instance: a timm
    model's stages are known once it is built."""

    pyramid_strides: tuple[int, ...] = ()
    """The downsampling factor of each `forward_pyramid` map relative to the input (e.g.
    (4, 8, 16, 32)); a decoder checks the crop is a multiple of the largest one."""

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, in_channels, H, W) -> one (B, C_i, H / s_i, W / s_i) map per entry of
        `pyramid_channels` / `pyramid_strides`, finest first: what U-Net / UPerNet decoders read."""
        raise SatfuseError(
            f"backbone {type(self).__name__} has no multi-scale feature maps; "
            f"dense decoders need one of: {', '.join(pyramid_backbones()) or 'none'}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them
        (`model.activation_checkpointing=true`): memory for compute, same gradients. A backbone
        that cannot is refused by name, so the key never silently does nothing."""
        raise SatfuseError(
            f"backbone {type(self).__name__} does not support activation checkpointing; "
            "set model.activation_checkpointing=false")

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """(pretrained weights of this architecture made loadable into this instance, one note per
        change): the fine-tuning loaders call it before comparing and loading, so a backbone can
        accept its library's layout (timm names, Microsoft Swin names) and a checkpoint trained
        at another crop (position embeddings resampled to this crop's grid). The notes are
        logged and recorded in the fine-tuning result. Default: unchanged, no notes."""
        return dict(state_dict), []

    @classmethod
    def library_layout(cls, state_dict: Mapping[str, torch.Tensor], img_size: int | None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """(`state_dict` in the layout of the library this backbone comes from, the fields that
        tell a reader which model to build for it: "architecture" and "load"): what the plain
        exports (`--format torchvision/timm/safetensors`) write. Default: unchanged."""
        return dict(state_dict), {"architecture": f"satfuse backbone {cls.__name__}"}

    @classmethod
    def owns_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """True when a plain state dict (head tensors `fc.*` already dropped) is this backbone's:
        the plain-weights loader asks every registered backbone, so weights are matched to a
        name by their content. Default: the same tensor names as an instance built for the
        bands of `input_weight` (one band when unknown)."""
        w = state_dict.get(cls.input_weight) if cls.input_weight else None
        bands = int(w.shape[1]) if isinstance(w, torch.Tensor) and w.dim() > 1 else 1
        return set(state_dict) == set(cls(bands).state_dict())


def backbone_class(name: str) -> type[Backbone]:
    """The registered backbone class `name`; an unknown name is refused listing every choice."""
    return BACKBONES.get(name)


def build_backbone(name: str, in_channels: int, zero_init_residual: bool = False,
                   img_size: int | None = None) -> Backbone:
    """The registered backbone `name` built for `in_channels` input bands and square crops of
    `img_size` pixels (None: the crop is not known; a backbone that needs it refuses by name).
    `img_size` reaches only classes whose `__init__` takes it, so plugin backbones written
    before it existed keep building."""
    if not isinstance(in_channels, int) or in_channels < 1:
        raise SatfuseError(
            f"backbone {name}: in_channels must be a positive integer, got {in_channels!r}"
        )
    cls = backbone_class(name)
    if "img_size" in inspect.signature(cls.__init__).parameters:
        return cls(in_channels, zero_init_residual=zero_init_residual, img_size=img_size)
    return cls(in_channels, zero_init_residual=zero_init_residual)


def check_export_format(name: str, fmt: str, where: str) -> None:
    """Refuse exporting backbone `name` as `fmt` when it does not declare that format."""
    if fmt in backbone_class(name).export_formats:
        return
    able = [n for n, cls in BACKBONES.items() if fmt in cls.export_formats]
    raise SatfuseError(
        f"{where}: backbone {name!r} has no {fmt} counterpart (only {', '.join(able) or 'none'} "
        "do); export it with the default --format satfuse")


def identify_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the registered backbone whose weights `state_dict` holds, or None."""
    return next((n for n, cls in BACKBONES.items() if cls.owns_state_dict(state_dict)), None)


def pyramid_backbones() -> list[str]:
    """The registered backbone names whose classes override `forward_pyramid`."""
    return [n for n, cls in BACKBONES.items() if cls.forward_pyramid is not Backbone.forward_pyramid]
