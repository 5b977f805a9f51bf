"""The three pretraining methods through build_pretrain_model: forward, loss, backward, export API."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from satfuse.config import LossConfig, ModelConfig
from satfuse.data.reading.augment import simclr_input, simclr_views
from satfuse.models import MMA, DualSimCLR, SimCLR, build_pretrain_model
from satfuse.utils import SatfuseError

SMALL = dict(backbone="tiny", proj_hidden=64, proj_out=32, mma_dim=16)


def batch(n: int = 6, size: int = 32, simclr: str | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        "s1": torch.randn(n, 2, size, size, generator=g),
        "s2": torch.randn(n, 13, size, size, generator=g),
    }
    if simclr:
        views = [
            simclr_views(simclr_input(s1, s2, simclr), g, size)
            for s1, s2 in zip(out["s1"], out["s2"], strict=True)
        ]
        out["view1"] = torch.stack([v[0] for v in views])
        out["view2"] = torch.stack([v[1] for v in views])
    return out


def check_loss_step(
    model: nn.Module, data: dict[str, torch.Tensor], loss_cfg: LossConfig
) -> dict[str, float]:
    """One optimiser step must change every parameter that the loss reaches and lower it."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loss, metrics = model.loss(model(data), loss_cfg)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(metrics) >= {"loss", "retrieval_top1"}
    assert 0.0 <= metrics["retrieval_top1"] <= 1.0
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing, missing
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        loss2, _ = model.loss(model(data), loss_cfg)
        loss2.backward()
    assert float(loss2.detach()) < metrics["loss"]
    unmoved = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unmoved, f"parameters the optimiser steps left unchanged: {unmoved}"
    return metrics


def test_dual_simclr() -> None:
    model = build_pretrain_model(ModelConfig(method="dual_simclr", **SMALL))
    assert isinstance(model, DualSimCLR)
    out = model(batch())
    assert out["z_s1"].shape == out["z_s2"].shape == (6, 32)
    assert model.in_channels() == {"s1": 2, "s2": 13}
    assert set(model.backbones()) == {"s1", "s2"}
    check_loss_step(model, batch(), LossConfig(temperature=0.2))
    check_loss_step(model, batch(), LossConfig(variant="infonce"))


def test_authors_default_sizes() -> None:
    model = build_pretrain_model(ModelConfig())  # resnet50, 2048-2048-128
    assert [m.weight.shape for m in model.head_s1.net if isinstance(m, nn.Linear)] == [
        (2048, 2048),
        (128, 2048),
    ]
    assert (
        model.backbone_s1.conv1.in_channels == 2 and model.backbone_s2.conv1.in_channels == 13
    )


@pytest.mark.parametrize("mode,channels", [("s2_rgb", 3), ("s2", 13), ("s1s2", 15)])
def test_simclr(mode: str, channels: int) -> None:
    model = build_pretrain_model(ModelConfig(method="simclr", simclr_input=mode, **SMALL))
    assert isinstance(model, SimCLR)
    assert model.in_channels() == {"shared": channels}
    data = batch(simclr=mode)
    assert data["view1"].shape[1] == channels
    check_loss_step(model, data, LossConfig())


def test_mma_dense_maps() -> None:
    model = build_pretrain_model(ModelConfig(method="mma", **SMALL))
    assert isinstance(model, MMA)
    out = model(batch(size=64))
    assert out["f_s1"].shape == out["f_s2"].shape == (6, 16, 4, 4)
    assert model.in_channels() == {"s1": 2, "s2": 13}
    check_loss_step(model, batch(size=64), LossConfig(variant="infonce"))


def test_bf16_autocast_model_loss_finite() -> None:
    model = build_pretrain_model(ModelConfig(method="dual_simclr", **SMALL))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model.loss(model(batch()), LossConfig())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_clear_errors_on_wrong_batches() -> None:
    model = build_pretrain_model(ModelConfig(method="dual_simclr", **SMALL))
    with pytest.raises(SatfuseError, match="no 's2'"):
        model({"s1": torch.zeros(2, 2, 32, 32)})
    with pytest.raises(SatfuseError, match=r"expected \(B, 2, H, W\)"):
        model({"s1": torch.zeros(2, 3, 32, 32), "s2": torch.zeros(2, 13, 32, 32)})
    simclr = build_pretrain_model(ModelConfig(method="simclr", **SMALL))
    with pytest.raises(SatfuseError, match="simclr_input"):
        simclr({"view1": torch.zeros(2, 13, 32, 32), "view2": torch.zeros(2, 13, 32, 32)})
    with pytest.raises(SatfuseError, match="model.method"):
        build_pretrain_model(ModelConfig(method="byol", **SMALL))  # type: ignore[arg-type]


def test_sync_bn_converts_and_runs_single_process() -> None:
    model = build_pretrain_model(ModelConfig(method="dual_simclr", sync_bn=True, **SMALL))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    # Without a process group SyncBatchNorm is plain BatchNorm: it runs on CPU.
    loss, _ = model.loss(model(batch()), LossConfig())
    assert torch.isfinite(loss)
