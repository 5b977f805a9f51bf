"""Loading pretrained backbones: export files, checkpoint directories, and mismatches."""

from __future__ import annotations

import pytest
import torch

from satfuse.evaluation.models import build_classifier
from satfuse.evaluation.pretrained import load_pretrained, pretrained_branches
from satfuse.utils import SatfuseError
from tests.evaluation.helpers import make_export

NORM = {"s1": {"mean": [-12.0, -19.0], "std": [3.0, 3.5], "clip": [-25.0, 0.0]},
        "s2": {"mean": [1500.0] * 13, "std": [500.0] * 13, "clip": [0.0, 10000.0]}}


def _same_weights(module: torch.nn.Module, state: dict) -> bool:
    sd = module.state_dict()
    return sd.keys() == state.keys() and all(torch.equal(sd[k], state[k]) for k in sd)


def test_export_file_loads_into_late_fusion_classifier(tmp_path):
    path = make_export(tmp_path / "dual.pt", normalization=NORM)
    pre = load_pretrained(path)
    assert pre.method == "dual_simclr" and pre.step == 7
    assert pre.band_stats()["s1"].mean == (-12.0, -19.0)
    specs = pretrained_branches(pre, "tiny", "s1s2", "late")
    assert [(s.name, s.input) for s in specs] == [("s1", "s1"), ("s2", "s2")]
    model = build_classifier(specs, "tiny", 8, frozen=True, state_dicts=pre.state_dicts, source=str(path))
    assert _same_weights(model.backbones[0], pre.state_dicts["s1"])
    assert _same_weights(model.backbones[1], pre.state_dicts["s2"])
    assert model.head.in_features == 2 * model.backbones[0].out_dim
    only_s1 = pretrained_branches(pre, "tiny", "s1", "late")
    assert [s.name for s in only_s1] == ["s1"]


def test_backbone_mismatch_names_what_differs(tmp_path):
    pre = load_pretrained(make_export(tmp_path / "dual.pt"))
    with pytest.raises(SatfuseError, match=r"backbone: checkpoint 'tiny' vs config model.backbone='resnet18'"):
        pretrained_branches(pre, "resnet18", "s1s2", "late")
    with pytest.raises(SatfuseError, match="no pretrained backbone for modalities=s1s2 fusion=early"):
        pretrained_branches(pre, "tiny", "s1s2", "early")


def test_in_channels_mismatch_is_listed(tmp_path):
    path = make_export(tmp_path / "bad.pt", in_channels={"s1": 3, "s2": 13})
    pre = load_pretrained(path)
    with pytest.raises(SatfuseError, match=r"in_channels\[s1\]: checkpoint 3 vs 2"):
        pretrained_branches(pre, "tiny", "s1s2", "late")


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    pre = load_pretrained(make_export(tmp_path / "dual.pt"))
    pre.backbone = "resnet18"  # pretend the file claims another backbone than its weights
    specs = pretrained_branches(pre, "resnet18", "s1", "late")
    with pytest.raises(SatfuseError, match="do not fit a resnet18"):
        build_classifier(specs, "resnet18", 8, frozen=False, state_dicts=pre.state_dicts, source="x")


def test_shared_simclr_backbone_by_channel_count(tmp_path):
    pre = load_pretrained(make_export(tmp_path / "simclr.pt", method="simclr", in_channels={"shared": 3}))
    specs = pretrained_branches(pre, "tiny", "s2", "late")
    assert [(s.name, s.input) for s in specs] == [("shared", "s2_rgb")]
    with pytest.raises(SatfuseError, match="modalities=s1"):
        pretrained_branches(pre, "tiny", "s1", "late")
    pre15 = load_pretrained(make_export(tmp_path / "s15.pt", method="simclr", in_channels={"shared": 15}))
    assert [s.input for s in pretrained_branches(pre15, "tiny", "s1s2", "late")] == ["s1s2"]


def test_not_an_export(tmp_path):
    with pytest.raises(SatfuseError, match="not found"):
        load_pretrained(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    torch.save({"format": "something-else"}, junk)
    with pytest.raises(SatfuseError, match="satfuse-backbones/1"):
        load_pretrained(junk)
    junk.write_bytes(b"not a torch file")
    with pytest.raises(SatfuseError, match="not a loadable"):
        load_pretrained(junk)


def test_ddp_checkpoint_directory_is_exported_and_loaded(tmp_path):
    """A real DCP checkpoint (as `satfuse pretrain` with DDP writes it) -> backbones."""
    from satfuse.checkpoint.manager import CheckpointManager
    from satfuse.checkpoint.state import ModelOptimState
    from satfuse.config import ModelConfig, to_dict
    from satfuse.models import build_pretrain_model

    mcfg = ModelConfig(method="dual_simclr", backbone="tiny", proj_hidden=32, proj_out=16)
    torch.manual_seed(3)
    model = build_pretrain_model(mcfg)
    opt = torch.optim.Adam(model.parameters())
    meta = {"config": {"model": to_dict(mcfg)}, "normalization": NORM}
    ckpt = CheckpointManager(tmp_path / "run").save(5, {"model_optim": ModelOptimState(model, opt)}, {}, meta)
    pre = load_pretrained(ckpt)
    assert pre.backbone == "tiny" and pre.step == 5 and set(pre.state_dicts) == {"s1", "s2"}
    assert _same_weights(model.backbone_s1, pre.state_dicts["s1"])
    assert _same_weights(model.backbone_s2, pre.state_dicts["s2"])
    assert pre.band_stats()["s2"].std == tuple([500.0] * 13)


@pytest.mark.deepspeed
@pytest.mark.slow
def test_deepspeed_checkpoint_directory_is_exported_and_loaded(sen12ms_shards, tmp_path, repo_root):
    """A real DeepSpeed (ZeRO-1) checkpoint from the trainer, 1 rank -> backbones that load."""
    from satfuse.checkpoint.deepspeed_export import fp32_state_dict
    from satfuse.evaluation.pretrained import pretrained_branches
    from tests.engines.ranks import logs, run_ranks

    run = tmp_path / "ds"
    (tmp_path / "logs").mkdir()
    overrides = [f"data.shards={sen12ms_shards}", f"train.run_dir={run}", "train.steps=4",
                 "checkpoint.every_steps=4"]
    codes = run_ranks(1, overrides, tmp_path / "logs", config=str(repo_root / "hpc/pretrain/tiny_deepspeed.yaml"))
    assert codes == [0], logs(tmp_path / "logs")
    ckpt = run / "checkpoints" / "step_00000004"
    pre = load_pretrained(ckpt)
    assert pre.step == 4 and pre.backbone == "tiny" and set(pre.state_dicts) == {"s1", "s2"}
    full = fp32_state_dict(ckpt)
    for name in ("s1", "s2"):
        prefix = f"backbone_{name}."
        assert {k[len(prefix):] for k in full if k.startswith(prefix)} == set(pre.state_dicts[name])
        for k, v in pre.state_dicts[name].items():
            assert torch.equal(v, full[prefix + k])
    specs = pretrained_branches(pre, "tiny", "s1s2", "late")
    build_classifier(specs, "tiny", 8, frozen=True, state_dicts=pre.state_dicts, source=str(ckpt))
