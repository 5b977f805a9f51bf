"""Backbone shapes, sizes and initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from satfuse.models import ProjectionHead, build_backbone
from satfuse.models.backbones import pyramid_backbones
from satfuse.utils import SatfuseError


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("in_channels", [2, 13, 15])
@pytest.mark.parametrize(
    "name,out_dim,size,spatial",
    [("tiny", 128, 64, 4), ("resnet18", 512, 64, 2), ("resnet50", 2048, 64, 2)],
)
def test_shapes(name: str, out_dim: int, size: int, spatial: int, in_channels: int) -> None:
    model = build_backbone(name, in_channels).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        pooled = model(x)
        fmap = model.forward_features(x)
    assert model.out_dim == out_dim
    assert model.in_channels == in_channels
    assert pooled.shape == (2, out_dim)
    assert fmap.shape == (2, out_dim, spatial, spatial)
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))


def test_resnet_parameter_counts_match_torchvision() -> None:
    # torchvision resnet50 has 25,557,032 parameters, 2,049,000 of them in fc;
    # resnet18 11,689,512 with 513,000 in fc.
    assert n_params(build_backbone("resnet50", 3)) == 25_557_032 - 2_049_000
    assert n_params(build_backbone("resnet18", 3)) == 11_689_512 - 513_000
    # Only conv1 depends on the bands: 64 * 7 * 7 weights per extra channel.
    assert (
        n_params(build_backbone("resnet50", 13)) - n_params(build_backbone("resnet50", 3))
        == 10 * 64 * 49
    )


def test_initialisation_like_torchvision() -> None:
    model = build_backbone("resnet18", 2)
    conv = model.layer2[0].conv1
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    bn = model.layer2[0].bn2
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(
        bn.bias, torch.zeros_like(bn.bias)
    )
    zero = build_backbone("tiny", 2, zero_init_residual=True)
    assert float(zero.layer1[0].bn2.weight.detach().abs().sum()) == 0.0


def test_tiny_trains_a_step() -> None:
    model = build_backbone("tiny", 13)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 13, 64, 64)
    before = model.conv1.weight.detach().clone()
    model(x).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, model.conv1.weight)


def test_projection_head_is_linear_relu_linear() -> None:
    head = ProjectionHead(2048, 2048, 128)
    kinds = [type(m) for m in head.net]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear]
    assert head(torch.randn(3, 2048)).shape == (3, 128)


def test_bad_backbone_arguments() -> None:
    with pytest.raises(SatfuseError, match="model.backbone"):
        build_backbone("vit", 3)
    with pytest.raises(SatfuseError, match="in_channels"):
        build_backbone("tiny", 0)


def test_backbone_and_method_names_come_from_the_registries() -> None:
    from satfuse.config import PretrainConfig, validate_pretrain
    from satfuse.models.backbones import check_export_format, identify_state_dict

    cfg = PretrainConfig()
    cfg.model.backbone = "vit"
    with pytest.raises(SatfuseError, match=r"unknown backbone 'vit' in model\.backbone; choose one of: "
                                           r"resnet18, resnet50, swin_tiny_patch4_window7, tiny, vit_base_patch16, "
                                           r"vit_small_patch16, timm:<any timm model>"):
        validate_pretrain(cfg)
    cfg.model.backbone, cfg.model.method = "tiny", "byol"
    with pytest.raises(SatfuseError, match=r"unknown pretraining method 'byol' in model\.method; choose one "
                                           r"of: dual_simclr, mma, simclr"):
        validate_pretrain(cfg)
    # weights are matched to a registered backbone by their tensors, not by a name list
    assert identify_state_dict(build_backbone("tiny", 2).state_dict()) == "tiny"
    assert identify_state_dict(build_backbone("resnet18", 13).state_dict()) == "resnet18"
    assert identify_state_dict({"other.weight": torch.zeros(1)}) is None
    check_export_format("resnet50", "safetensors", "here")  # declared: no error
    with pytest.raises(SatfuseError, match=r"here: backbone 'tiny' has no torchvision counterpart \(only "
                                           r"resnet18, resnet50 do\)"):
        check_export_format("tiny", "torchvision", "here")


@pytest.mark.parametrize("name,strides,channels", [("tiny", (2, 4, 8, 16), (16, 32, 64, 128)),
                                                   ("resnet18", (4, 8, 16, 32), (64, 128, 256, 512))])
def test_resnet_pyramid_is_layer1_to_layer4(name: str, strides: tuple, channels: tuple) -> None:
    model = build_backbone(name, 2).eval()
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        maps = model.forward_pyramid(x)
        last = model.forward_features(x)
    assert model.pyramid_strides == strides and model.pyramid_channels == channels
    assert [tuple(m.shape) for m in maps] == [(1, c, 64 // s, 64 // s) for c, s in zip(channels, strides, strict=True)]
    torch.testing.assert_close(maps[-1], last)
    assert {"tiny", "resnet18", "resnet50"} <= set(pyramid_backbones())


def test_resnet_activation_checkpointing_same_gradients_and_bn_stats() -> None:
    torch.manual_seed(0)
    plain = build_backbone("tiny", 3)
    ckpt = build_backbone("tiny", 3)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    calls = []
    ckpt.layer2.register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 3, 32, 32)
    for m in (plain, ckpt):
        m(x).pow(2).sum().backward()
    assert len(calls) == 2  # layer2 ran again in the backward pass: its activations were not kept
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)
    for (n, b), c in zip(plain.named_buffers(), ckpt.buffers(), strict=True):  # BatchNorm stats moved once
        torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-7, msg=n)
    ckpt.set_grad_checkpointing(False)
    calls.clear()
    ckpt(x).sum().backward()
    assert len(calls) == 1
