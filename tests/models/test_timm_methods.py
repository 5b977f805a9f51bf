"""Every pretraining method runs on timm backbones: Dual-SimCLR and SimCLR on pooled features,
MMA on the spatial map (a ViT's token grid, a Swin's last stage)."""

from __future__ import annotations

import pytest
import torch

from satfuse.config import LossConfig, ModelConfig
from satfuse.models import build_pretrain_model


@pytest.mark.parametrize("method,backbone,crop,grid", [
    ("dual_simclr", "timm:vit_tiny_patch16_224", 32, None),
    ("simclr", "timm:vit_tiny_patch16_224", 32, None),
    ("mma", "timm:vit_tiny_patch16_224", 32, 2),
    ("mma", "swin_tiny_patch4_window7", 64, 2),
])
def test_methods_train_a_step_on_timm_backbones(method: str, backbone: str, crop: int, grid: int | None) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(method=method, backbone=backbone, proj_hidden=16, proj_out=8, mma_dim=8)
    model = build_pretrain_model(cfg, img_size=crop)
    b = 4
    batch = {"s1": torch.randn(b, 2, crop, crop), "s2": torch.randn(b, 13, crop, crop)}
    if method == "simclr":
        batch = {"view1": torch.randn(b, 3, crop, crop), "view2": torch.randn(b, 3, crop, crop)}
    if grid is not None:  # MMA aligns the spatial map location by location
        assert model.backbone_s1.forward_features(batch["s1"]).shape[-2:] == (grid, grid)
    loss, _ = model.loss(model(batch), LossConfig(temperature=0.1))
    loss.backward()
    assert torch.isfinite(loss)
    trunk = next(iter(model.backbones().values()))
    assert trunk.model.patch_embed.proj.weight.grad.abs().sum() > 0  # gradients reach the trunk


def test_bench_model_and_train_rows_take_timm_backbones() -> None:
    """`satfuse bench model --backbone vit_base_patch16` counts the real ViT-B/16 pair (meta
    device, built for --crop); `bench train --models ...` times a ViT step at its crop."""
    import timm

    from satfuse.bench.model import count_params
    from satfuse.bench.train import time_steps

    trunks = sum(sum(p.numel() for p in timm.create_model("vit_base_patch16_224", in_chans=c, num_classes=0).parameters())
                 for c in (2, 13))
    heads = 2 * (768 * 64 + 64 + 64 * 32 + 32)
    assert count_params("vit_base_patch16", 64, 32, crop=224) == trunks + heads
    assert count_params("vit_base_patch16", 64, 32, crop=112) == trunks + heads - 2 * (196 - 49) * 768  # pos_embed
    assert time_steps("timm:vit_tiny_patch16_224", 2, 32, 1, "fp32", torch.device("cpu")) > 0
