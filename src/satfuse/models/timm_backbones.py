"""Backbones from timm: any timm model as `timm:<name>`, and short names for the ones the
S1/S2 self-supervised literature uses (`vit_small_patch16`, `vit_base_patch16`,
`swin_tiny_patch4_window7`).

Why timm: it is the field's library for ViT/Swin (SSL4EO-S12's ViT-S/16, the seed authors'
Swin-T follow-up), and building it with `in_chans` = the band count, `num_classes=0` and
`img_size` = the crop is all a satfuse backbone needs. The timm model is kept whole as the
submodule `model`, so a satfuse state dict is timm's with a `model.` prefix; the timm export
(`satfuse ckpt export --format timm`) and the plain-weights loader add/strip that prefix
(`timm_state_dict` / `adapt_plain_state_dict`), nowhere else.

What the contract members are for these models:
- `forward(x)`: timm's own pooled pre-logits features (`num_classes=0`): the class token for a
  ViT (as SSL4EO-S12's linear probes read it), the average of the last stage for Swin.
- `forward_features(x)`: a spatial map, (B, C, H', W'). ViT: its final (normed) patch tokens,
  prefix tokens dropped, as the token grid (stride = the patch size, 16 for ViT-*/16); Swin:
  its last stage, NCHW (stride 32). MMA aligns these maps location by location.
- `forward_pyramid(x)`: Swin: its four stages, NCHW, strides 4/8/16/32 (timm's
  `forward_intermediates`). ViT: it has one token grid, so the pyramid is the outputs of four
  evenly spaced blocks (depth 12: blocks 3, 6, 9, 12, the UNETR / ViTDet choice), all at the
  patch stride (16, 16, 16, 16): a decoder upsamples them itself. Other timm models: the last
  four entries of their `feature_info`.
- `set_grad_checkpointing`: timm's own (checkpointing per block).

Crops: a ViT takes crops that are a multiple of its patch size; a Swin takes crops that are a
multiple of patch x 2^(stages - 1) (32 for Swin-T), so every stage's map is whole (timm pads a
stage whose map the window does not tile, as Microsoft's Swin does, and a stage smaller than
the window uses a window of its size). Another crop is refused naming the nearest valid ones.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from satfuse.models.backbones import Backbone
from satfuse.registry import BACKBONES
from satfuse.utils import SatfuseError

log = logging.getLogger(__name__)

PREFIX = "model."  # where the timm model sits in a satfuse backbone's state dict
TIMM_FORMATS = frozenset({"timm", "safetensors"})


@dataclass(frozen=True)
class TimmInfo:
    """What satfuse needs to know about a timm model before building one for real."""

    name: str
    num_features: int
    takes_img_size: bool
    input_weight: str  # timm key of the first layer's weight (dim 1 = bands)
    shapes: Mapping[str, tuple[int, ...]]  # timm state-dict key -> shape (3 bands, default crop)
    family: str  # "vit", "swin" or "other"
    patch: int  # ViT/Swin patch size (0: other)
    stages: int  # Swin stages (0: other)
    window: int  # Swin window (0: other)


def _timm() -> Any:
    """The timm module, or a one-line error with the install command (timm is the `timm` extra)."""
    try:
        import timm  # optional: timm
    except ImportError:
        raise SatfuseError("timm backbones need timm: pip install 'satfuse[timm]' (install the "
                           "torchvision matching your torch first; README, Set-up)") from None
    return timm


def timm_available() -> bool:
    """Whether timm imports here (weights lookups skip timm backbones without it)."""
    try:
        _timm()
    except SatfuseError:
        return False
    return True


@functools.cache
def timm_info(name: str) -> TimmInfo:
    """Built on the meta device (no memory, no init: a ViT-B costs ~0.3 s), once per name."""
    timm = _timm()
    from timm.models.swin_transformer import SwinTransformer  # optional: timm
    from timm.models.vision_transformer import VisionTransformer  # optional: timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise SatfuseError(
            f"unknown timm model {name!r} in model.backbone=timm:{name}; "
            f"{'similar: ' + ', '.join(close) if close else 'see timm.list_models()'}")
    cfg = timm.get_pretrained_cfg(name)
    default_img = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    first = f"{cfg.first_conv}.weight" if cfg is not None and cfg.first_conv else ""
    with torch.device("meta"):
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, img_size=default_img)
            takes_img_size = True
        except TypeError:
            model = timm.create_model(name, pretrained=False, num_classes=0)
            takes_img_size = False
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if first not in shapes:
        first = next((k for k, v in model.state_dict().items() if v.dim() == 4), "")
    family, patch, stages, window = "other", 0, 0, 0
    if isinstance(model, VisionTransformer):
        family, patch = "vit", int(model.patch_embed.patch_size[0])
    elif isinstance(model, SwinTransformer):
        family, patch, stages = "swin", int(model.patch_embed.patch_size[0]), len(model.layers)
        window = int(model.layers[0].blocks[0].window_size[0])
    return TimmInfo(name, int(model.num_features), takes_img_size, first, shapes, family, patch, stages, window)


def crop_multiple(info: TimmInfo) -> int:
    """The crops a model takes are the multiples of this (1: any crop)."""
    if info.family == "vit":
        return info.patch
    if info.family == "swin":
        return info.patch * 2 ** (info.stages - 1)
    return 1


def check_crop(backbone: str, info: TimmInfo, img_size: int | None) -> None:
    """Refuse a crop the model cannot tile, naming the nearest valid crops."""
    if not info.takes_img_size:
        return
    if img_size is None or img_size < 1:
        raise SatfuseError(
            f"backbone {backbone} sizes itself from the crop: set data.crop (pretraining) or the "
            "fine-tuning crop to a positive size")
    m = crop_multiple(info)
    if img_size % m:
        lower, upper = img_size // m * m, (img_size // m + 1) * m
        near = " or ".join(str(c) for c in (lower, upper) if c > 0)
        what = f"patch size {m}" if info.family == "vit" else (
            f"patch {info.patch} x 2^{info.stages - 1} stages = {m} (window {info.window})")
        raise SatfuseError(f"backbone {backbone}: crop {img_size} is not a multiple of its {what}; "
                           f"use crop {near}")


class TimmBackbone(Backbone):
    """A timm model as a satfuse backbone (see the module doc for what each member returns).

    Subclasses fix `timm_name` (and `feature_dim`, known before building); `timm:<name>` makes
    one per name (`timm_backbone_class`)."""

    timm_name: ClassVar[str]
    export_formats = TIMM_FORMATS
    input_weight = "patch_embed.proj.weight"  # timm's key (plain weights are in timm's layout)

    def __init__(self, in_channels: int, zero_init_residual: bool = False, img_size: int | None = None) -> None:
        """`zero_init_residual` is a ResNet recipe; timm's own initialisation is kept."""
        super().__init__(in_channels, zero_init_residual)
        info = timm_info(self.timm_name)
        check_crop(self.backbone_name(), info, img_size)
        kwargs: dict[str, Any] = {"img_size": img_size} if info.takes_img_size else {}
        self.img_size = img_size
        self.model = _timm().create_model(self.timm_name, pretrained=False, num_classes=0,
                                       in_chans=in_channels, **kwargs)
        self.family = info.family
        self._pyramid_indices = self._choose_pyramid()
        feats = self.model.feature_info
        self.pyramid_channels = tuple(int(feats[i]["num_chs"]) for i in self._pyramid_indices)
        self.pyramid_strides = tuple(int(feats[i]["reduction"]) for i in self._pyramid_indices)

    @classmethod
    def backbone_name(cls) -> str:
        """The `model.backbone` value users give for this class."""
        short = {v: k for k, v in SHORT_NAMES.items()}
        return short.get(cls.timm_name, f"timm:{cls.timm_name}")

    def _choose_pyramid(self) -> list[int]:
        n = len(self.model.feature_info)
        if self.family == "vit":  # four evenly spaced blocks of one token grid
            return [n * (i + 1) // 4 - 1 for i in range(4)] if n >= 4 else list(range(n))
        return list(range(max(0, n - 4), n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        if out.dim() == 3:  # tokens: drop class/register tokens, lay the rest out as the grid
            h, w = self.model.patch_embed.dynamic_feat_size(x.shape[-2:]) if hasattr(
                self.model.patch_embed, "dynamic_feat_size") else self.model.patch_embed.grid_size
            out = out[:, getattr(self.model, "num_prefix_tokens", 0):]
            return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            return out.permute(0, 3, 1, 2)
        return out

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.forward_intermediates(
            x, indices=self._pyramid_indices, output_fmt="NCHW", intermediates_only=True))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Accept satfuse's layout (`model.` prefix), timm's, and Microsoft's Swin names (the
        seed authors' SSLTransformerRS checkpoints: downsampling at the end of a stage, the
        relative-position index/mask buffers saved, through timm's own
        `swin_transformer.checkpoint_filter_fn`); drop a classifier/projection `head.*` this
        headless model lacks; resample a ViT's position embeddings (bicubic, class/register
        tokens kept) when the checkpoint's patch grid is not this crop's, and Swin's
        relative-position tables when its window is not this model's. Each change is a note."""
        sd = {_strip(k): v for k, v in state_dict.items()}
        notes: list[str] = []
        mine = self.model.state_dict()
        head = sorted(k for k in sd if k.startswith("head.") and k not in mine)
        if head:
            notes.append(f"dropped the head tensors {', '.join(head)}")
            sd = {k: v for k, v in sd.items() if k not in head}
        if self.family == "swin" and any(
                "relative_position_index" in k or "attn_mask" in k or k.startswith("layers.0.downsample.")
                or ("relative_position_bias_table" in k and k in mine and sd[k].shape != mine[k].shape)
                for k in sd):
            from timm.models.swin_transformer import checkpoint_filter_fn  # optional: timm

            microsoft = "layers.0.downsample.reduction.weight" in sd
            sd = checkpoint_filter_fn(sd, self.model)
            notes.append("Microsoft Swin names converted to timm's" if microsoft
                         else "Swin relative-position tables resized to this window")
        pe, own = sd.get("pos_embed"), mine.get("pos_embed")
        if isinstance(pe, torch.Tensor) and own is not None and pe.dim() == 3 and pe.shape != own.shape:
            from timm.layers import resample_abs_pos_embed  # optional: timm

            prefix = 0 if getattr(self.model, "no_embed_class", False) else int(self.model.num_prefix_tokens)
            old = round((pe.shape[1] - prefix) ** 0.5)
            new = tuple(int(g) for g in self.model.patch_embed.grid_size)
            if old * old == pe.shape[1] - prefix and pe.shape[2] == own.shape[2]:
                sd["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(new), old_size=[old, old],
                                                         num_prefix_tokens=prefix, verbose=False)
                notes.append(f"pos_embed resampled from a {old}x{old} to a {new[0]}x{new[1]} patch grid "
                             f"(crop {self.img_size}, bicubic)")
        return {PREFIX + k: v for k, v in sd.items()}, notes

    @classmethod
    def library_layout(cls, state_dict: Mapping[str, torch.Tensor], img_size: int | None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """timm's names (satfuse's `model.` prefix stripped), and the `create_model` call they
        load into with strict=True (img_size: the crop they were trained at)."""
        size = f", img_size={img_size}" if img_size and timm_info(cls.timm_name).takes_img_size else ""
        return timm_state_dict(state_dict), {
            "architecture": f"timm:{cls.timm_name}", "timm_model": cls.timm_name, "img_size": img_size,
            "load": f"timm.create_model('{cls.timm_name}', in_chans=in_channels{size}, num_classes=0)"}

    @classmethod
    def owns_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """The tensor names equal this timm model's (with or without satfuse's `model.`
        prefix) and so do the shapes, except those the bands or the crop set (the input layer,
        position embeddings, Swin's relative-position tables): ViT-S and ViT-B share every
        name. Read from a meta-device build cached per name: cheap on every lookup."""
        if not timm_available():
            return False
        info = timm_info(cls.timm_name)
        sd = _timm_names({_strip(k): v for k, v in state_dict.items()}, info)
        if set(sd) != set(info.shapes):
            return False
        return all(tuple(getattr(v, "shape", ())) == info.shapes[k] for k, v in sd.items()
                   if k != info.input_weight and not _crop_sized(k))


def _timm_names(sd: dict[str, torch.Tensor], info: TimmInfo) -> dict[str, torch.Tensor]:
    """Names only (no tensor changes), for recognising a state dict: a head this headless model
    lacks dropped, and for a Swin Microsoft's layout (saved index/mask buffers, downsampling at
    the end of a stage) read as timm's."""
    sd = {k: v for k, v in sd.items() if not (k.startswith("head.") and k not in info.shapes)}
    if info.family != "swin":
        return sd
    shift = "layers.0.downsample.reduction.weight" in sd
    return {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            if shift else k: v for k, v in sd.items()
            if "relative_position_index" not in k and "attn_mask" not in k}


def _crop_sized(key: str) -> bool:
    """Tensors whose shape follows the crop (or the window it leaves), not the architecture."""
    return key.endswith("pos_embed") or "relative_position" in key


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A satfuse timm backbone's state dict in timm's own layout (what `timm.create_model`
    loads with strict=True)."""
    return {_strip(k): v for k, v in state_dict.items()}


@functools.cache
def timm_backbone_class(name: str) -> type[TimmBackbone]:
    """The backbone class of `timm:<name>` (made once per name; `feature_dim` from a meta build)."""
    info = timm_info(name)
    return type(f"Timm_{name}", (TimmBackbone,), {
        "timm_name": name, "feature_dim": info.num_features, "input_weight": info.input_weight,
        "__module__": __name__,
        "__doc__": f"timm's {name} (in_chans = the bands, num_classes=0, img_size = the crop)."})


@BACKBONES.register("vit_small_patch16")
class VitSmallPatch16(TimmBackbone):
    """ViT-S/16 (SSL4EO-S12's MoCo/DINO/MAE backbone): 384 features, patch grid at stride 16."""

    timm_name, feature_dim = "vit_small_patch16_224", 384


@BACKBONES.register("vit_base_patch16")
class VitBasePatch16(TimmBackbone):
    """ViT-B/16: 768 features, patch grid at stride 16."""

    timm_name, feature_dim = "vit_base_patch16_224", 768


@BACKBONES.register("swin_tiny_patch4_window7")
class SwinTinyPatch4Window7(TimmBackbone):
    """Swin-T (the seed authors' SSLTransformerRS backbone): 768 features, 4 stages."""

    timm_name, feature_dim = "swin_tiny_patch4_window7_224", 768


SHORT_NAMES = {"vit_small_patch16": VitSmallPatch16.timm_name, "vit_base_patch16": VitBasePatch16.timm_name,
               "swin_tiny_patch4_window7": SwinTinyPatch4Window7.timm_name}
