"""Backbones from timm: short names, `timm:<name>`, the contract members, crops and names."""

from __future__ import annotations

import pytest
import torch

from satfuse.models.backbones import backbone_class, build_backbone, identify_state_dict
from satfuse.registry import BACKBONES
from satfuse.utils import SatfuseError


@pytest.mark.parametrize("name,crop,grid,channels,strides", [
    ("vit_small_patch16", 32, 2, (384,) * 4, (16,) * 4),
    ("swin_tiny_patch4_window7", 64, 2, (96, 192, 384, 768), (4, 8, 16, 32)),
    ("timm:vit_tiny_patch16_224", 48, 3, (192,) * 4, (16,) * 4),
])
def test_timm_backbone_contract(name: str, crop: int, grid: int, channels: tuple, strides: tuple) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, 13, img_size=crop).eval()  # eval: Swin's stochastic depth off
    x = torch.randn(2, 13, crop, crop)
    with torch.no_grad():
        fmap, pooled, pyr = model.forward_features(x), model(x), model.forward_pyramid(x)
    dim = backbone_class(name).feature_dim  # known before building, equal to the built one
    assert model.out_dim == dim == model.model.num_features and model.in_channels == 13
    assert model.model.patch_embed.proj.weight.shape[1] == 13  # in_chans = the bands
    assert fmap.shape == (2, dim, grid, grid) and pooled.shape == (2, dim)
    assert (model.pyramid_channels, model.pyramid_strides) == (channels, strides)
    assert [tuple(m.shape) for m in pyr] == [(2, c, crop // s, crop // s) for c, s in zip(channels, strides, strict=True)]
    if "vit" in name:  # the token grid is the final normed patch tokens, row-major
        tokens = model.model.forward_features(x)[:, model.model.num_prefix_tokens:]
        torch.testing.assert_close(fmap[:, :, 1, 0], tokens[:, grid])
    else:  # Swin: its last stage, NCHW; the pooled features are its mean
        torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    # weights are matched to a name by names and shapes (ViT-S and ViT-B share every name)
    expect = None if name.startswith("timm:") else name
    assert identify_state_dict(model.state_dict()) == expect
    assert identify_state_dict({k.removeprefix("model."): v for k, v in model.state_dict().items()}) == expect


def test_timm_grad_checkpointing_same_gradients() -> None:
    torch.manual_seed(0)
    plain = build_backbone("timm:vit_tiny_patch16_224", 2, img_size=32)
    ckpt = build_backbone("timm:vit_tiny_patch16_224", 2, img_size=32)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    assert ckpt.model.grad_checkpointing and not plain.model.grad_checkpointing
    x = torch.randn(3, 2, 32, 32)
    for m in (plain, ckpt):
        m.forward_features(x).pow(2).mean().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_timm_names_and_bad_input() -> None:
    assert BACKBONES.names()[-1] == "timm:<any timm model>"
    BACKBONES.require("timm:vit_huge_patch14_224")  # checked torch-free; built on use
    with pytest.raises(SatfuseError, match=r"unknown backbone 'vit' in model\.backbone; choose one of: resnet18, "
                                           r"resnet50, swin_tiny_patch4_window7, tiny, vit_base_patch16, "
                                           r"vit_small_patch16, timm:<any timm model>"):
        build_backbone("vit", 3)
    with pytest.raises(SatfuseError, match=r"unknown timm model 'vit_nonesuch' in model\.backbone=timm:vit_nonesuch"):
        build_backbone("timm:vit_nonesuch", 3, img_size=32)
    with pytest.raises(SatfuseError, match=r"^backbone vit_small_patch16: crop 40 is not a multiple of its patch "
                                           r"size 16; use crop 32 or 48$"):
        build_backbone("vit_small_patch16", 2, img_size=40)
    with pytest.raises(SatfuseError, match=r"^backbone swin_tiny_patch4_window7: crop 100 .* = 32 \(window 7\); "
                                           r"use crop 96 or 128$"):
        build_backbone("swin_tiny_patch4_window7", 2, img_size=100)
    with pytest.raises(SatfuseError, match=r"crop 8 .* use crop 16$"):
        build_backbone("vit_base_patch16", 2, img_size=8)
    with pytest.raises(SatfuseError, match="sizes itself from the crop: set data.crop"):
        build_backbone("vit_small_patch16", 2)
    # a timm model that takes no img_size (a CNN) builds for any crop
    assert build_backbone("timm:resnet18", 2, img_size=40).out_dim == 512
