"""Checkpoints written before the backbones took torchvision's names (`stem.0`/`stem.1`)
still resume, export and fine-tune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from satfuse.checkpoint.manager import CheckpointManager
from satfuse.checkpoint.state import ModelOptimState
from satfuse.config import ModelConfig, PretrainConfig, to_dict
from satfuse.models import build_pretrain_model
from satfuse.models.legacy import upgrade_key
from satfuse.models.resnet import ResNet


def _tiny_cfg() -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.model = ModelConfig(method="dual_simclr", backbone="tiny", proj_hidden=16, proj_out=8)
    return cfg


def _to_old_layout(model: nn.Module) -> nn.Module:
    """Put every ResNet's stem back into the old `stem` Sequential (the old parameter names)."""
    for m in model.modules():
        if isinstance(m, ResNet):
            stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
            for name in ("conv1", "bn1", "relu", "maxpool"):
                delattr(m, name)
            m.stem = stem
    return model


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    batch = {"s1": torch.randn(4, 2, 16, 16), "s2": torch.randn(4, 13, 16, 16)}
    loss, _ = model.loss(model(batch), PretrainConfig().loss)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_upgrade_key_renames_whole_components_only() -> None:
    assert upgrade_key("backbone_s1.stem.0.weight") == "backbone_s1.conv1.weight"
    assert upgrade_key("stem.1.running_var") == "bn1.running_var"
    assert upgrade_key("model_optim.optim.state.backbone_s2.stem.1.bias.exp_avg") == \
        "model_optim.optim.state.backbone_s2.bn1.bias.exp_avg"
    assert upgrade_key("mystem.0.weight") == "mystem.0.weight"
    assert upgrade_key("stem.10.weight") == "stem.10.weight"
    assert upgrade_key("layer1.0.conv1.weight") == "layer1.0.conv1.weight"


def test_a_checkpoint_with_old_names_resumes_and_exports(tmp_path: Path) -> None:
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = build_pretrain_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _step(model, opt)  # Adam state exists, keyed by the parameter names
    old = _to_old_layout(model)
    assert "backbone_s1.stem.0.weight" in old.state_dict()
    path = CheckpointManager(tmp_path / "run").save(
        1, {"model_optim": ModelOptimState(old, opt)}, {"step": 1},
        {"config": to_dict(cfg), "normalization": None})
    old_sd = {upgrade_key(k): v.clone() for k, v in old.state_dict().items()}
    old_exp_avg = opt.state[old.backbone_s1.stem[0].weight]["exp_avg"].clone()

    # resume: model and optimizer state come back under the new names
    torch.manual_seed(1)
    fresh = build_pretrain_model(cfg.model)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    _step(fresh, fresh_opt)
    CheckpointManager(tmp_path / "run").load(path, {"model_optim": ModelOptimState(fresh, fresh_opt)})
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, old_sd[k]), k
    assert torch.equal(fresh_opt.state[fresh.backbone_s1.conv1.weight]["exp_avg"], old_exp_avg)

    # export: the old checkpoint exports with the torchvision names
    from satfuse.checkpoint.export import export_backbones, load_backbones

    export_backbones(path, tmp_path / "bb.pt")
    doc = load_backbones(tmp_path / "bb.pt")
    assert "conv1.weight" in doc["state_dicts"]["s1"]
    assert torch.equal(doc["state_dicts"]["s2"]["bn1.running_mean"],
                       old_sd["backbone_s2.bn1.running_mean"])

    # the tiny backbone has no torchvision counterpart: refused, pointing at the default format
    from satfuse.checkpoint.formats import export
    from satfuse.utils import SatfuseError

    with pytest.raises(SatfuseError, match="'tiny' has no torchvision counterpart.*--format satfuse"):
        export(path, tmp_path / "tv.pt", "torchvision")
    assert not (tmp_path / "tv.pt").exists()


def test_an_old_export_file_loads_into_the_backbone() -> None:
    from satfuse.models.backbones import build_backbone

    src = build_backbone("tiny", 2)
    old = {k.replace("conv1.", "stem.0.", 1) if k.startswith("conv1.") else
           k.replace("bn1.", "stem.1.", 1) if k.startswith("bn1.") else k: v
           for k, v in src.state_dict().items()}
    assert "stem.0.weight" in old
    dst = build_backbone("tiny", 2)
    dst.load_state_dict(old, strict=True)
    assert torch.equal(dst.conv1.weight, src.conv1.weight)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_names_have_no_stem(name: str) -> None:
    from satfuse.models.backbones import build_backbone

    keys = list(build_backbone(name, 13).state_dict())
    assert keys[0] == "conv1.weight" and keys[1] == "bn1.weight"
    assert not any(k.startswith("stem.") for k in keys)
