"""timm backbones' weights out and in: a ViT-S/16 pretrained one step exports as timm state
dicts that `timm.create_model` loads strictly, fine-tunes (and linear-probes) back from them,
resamples position embeddings to another crop; the seed authors' Swin-T layout loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from satfuse.cli import main
from satfuse.config import from_dict
from satfuse.evaluation.finetune import FinetuneConfig, run_finetune
from satfuse.evaluation.models import BranchSpec, build_classifier
from satfuse.evaluation.plain_weights import load_for_finetune
from satfuse.models.backbones import build_backbone
from satfuse.utils import SatfuseError

ROOT = Path(__file__).resolve().parents[2]
CHANNELS = {"s1": 2, "s2": 13}


@pytest.fixture(scope="module")
def vit_run(sen12ms_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Dual-SimCLR ViT-S/16 pretrained for one step (32x32: a 2x2 token grid, batch 2)."""
    from satfuse.engines.pretrain import run_pretrain

    run = tmp_path_factory.mktemp("vit") / "run"
    code = run_pretrain(str(ROOT / "hpc" / "pretrain" / "tiny.yaml"), [
        f"data.shards={sen12ms_shards}", "data.batch_size=2", "data.crop=32", "data.num_workers=0",
        "model.backbone=vit_small_patch16", "model.proj_hidden=32", "model.proj_out=16", "train.steps=1",
        "train.device=cpu", f"train.run_dir={run}", "checkpoint.every_steps=1", "train.log_every=1"])
    assert code == 0
    return run


def _ft_cfg(dfc_shards: dict[str, Path], run_dir: Path, **model) -> FinetuneConfig:
    raw = {"data": {"train_shards": str(dfc_shards["train"]), "test_shards": str(dfc_shards["test"]),
                    "crop": 32, "batch_size": 16, "eval_batch_size": 64},
           "model": {"backbone": "vit_small_patch16", "modalities": "s1s2", "fusion": "late", **model},
           "train": {"epochs": 1, "patience": 0, "seed": 1, "device": "cpu"}, "run_dir": str(run_dir)}
    return from_dict(FinetuneConfig, raw)


@pytest.mark.slow
def test_timm_export_loads_in_timm_and_fine_tunes_back(vit_run: Path, dfc_shards: dict[str, Path],
                                                       tmp_path: Path) -> None:
    import timm

    from satfuse.checkpoint.export import default_builder, load_dcp_model, resolve_checkpoint

    out = tmp_path / "vit.pt"
    assert main(["ckpt", "export", str(vit_run), "--out", str(out), "--format", "timm"]) == 0
    sds = torch.load(out, map_location="cpu", weights_only=True)
    side = json.loads((tmp_path / "vit.normalization.json").read_text())
    assert set(sds) == {"s1", "s2"} and side["img_size"] == 32 and side["timm_model"] == "vit_small_patch16_224"
    ours, _ = load_dcp_model(resolve_checkpoint(vit_run), default_builder)
    for name, sd in sds.items():  # strict=True into timm's own model, same outputs as satfuse's
        ref = timm.create_model("vit_small_patch16_224", in_chans=CHANNELS[name], img_size=32, num_classes=0)
        ref.load_state_dict(sd, strict=True)
        x = torch.randn(2, CHANNELS[name], 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(ref.eval()(x), ours.backbones()[name].eval()(x))
    st = tmp_path / "vits.safetensors"
    assert main(["ckpt", "export", str(vit_run), "--out", str(st), "--format", "safetensors"]) == 0
    from safetensors import safe_open
    with safe_open(str(st), framework="pt") as fh:
        assert "s2.patch_embed.proj.weight" in set(fh.keys())
    assert main(["ckpt", "export", str(vit_run), "--out", str(tmp_path / "tv.pt"), "--format", "torchvision"]) != 0

    # fine-tune and linear-probe back from the timm file (satfuse finetune --backbone vit_small_patch16)
    res = run_finetune(_ft_cfg(dfc_shards, tmp_path / "ft", checkpoint=str(out)))
    assert res["checkpoint"]["branches"] == ["s1", "s2"] and 0.0 <= res["metrics"]["oa"] <= 1.0
    lin = run_finetune(_ft_cfg(dfc_shards, tmp_path / "lin", checkpoint=str(out), mode="linear"))
    assert 0.0 <= lin["metrics"]["oa"] <= 1.0

    # another crop: position embeddings resampled (2x2 -> 3x3 patch grid) and recorded
    note = "pos_embed resampled from a 2x2 to a 3x3 patch grid (crop 48, bicubic)"
    pre = load_for_finetune(str(out), "vit_small_patch16", img_size=48)  # a plain file
    assert pre.adapted == [f"s1: {note}", f"s2: {note}"]
    satfuse_export = tmp_path / "vit_satfuse.pt"  # satfuse's own export, adapted when built
    assert main(["ckpt", "export", str(vit_run), "--out", str(satfuse_export)]) == 0
    from satfuse.evaluation.pretrained import load_pretrained
    model = build_classifier([BranchSpec("s2", "s2")], "vit_small_patch16", 8, False,
                             load_pretrained(str(satfuse_export)).state_dicts, "x", img_size=48)
    assert model.weight_notes == [f"s2: {note}"]
    assert model.backbones[0].model.pos_embed.shape == (1, 10, 384)

    # another backbone or band set: refused naming both
    with pytest.raises(SatfuseError, match=r"the s1 weights are a vit_small_patch16, the config has "
                                           r"model\.backbone=vit_base_patch16"):
        load_for_finetune(str(out), "vit_base_patch16", img_size=32)
    torch.save({"s2": sds["s1"]}, tmp_path / "s1_as_s2.pt")
    with pytest.raises(SatfuseError, match=r"s2 tensor model\.patch_embed\.proj\.weight has shape \(384, 2, 16, 16\) "
                                           r"in the checkpoint but \(384, 13, 16, 16\)"):
        load_for_finetune(str(tmp_path / "s1_as_s2.pt"), "vit_small_patch16", img_size=32)


def _microsoft_swin(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's Swin state dict in Microsoft's layout (what the seed authors' code saves): each
    stage's downsampling at the end of the previous stage, the relative-position index saved."""
    import re

    out = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
           for k, v in sd.items()}
    for name, buf in model.named_buffers():
        if name.endswith("relative_position_index"):
            out[name] = buf
    out["head.weight"], out["head.bias"] = torch.zeros(10, 768), torch.zeros(10)
    return out


def test_seed_authors_swin_checkpoint_loads(tmp_path: Path) -> None:
    from satfuse.models.timm_backbones import timm_state_dict

    torch.manual_seed(0)
    bbs = {m: build_backbone("swin_tiny_patch4_window7", c, img_size=64) for m, c in CHANNELS.items()}
    plain = {m: timm_state_dict(b.state_dict()) for m, b in bbs.items()}
    authors = {"epoch": 100, "arch": "swin_t", "optimizer": {}, "state_dict": {
        f"backbone{i}.{k}": v for i, m in ((1, "s1"), (2, "s2")) for k, v in _microsoft_swin(plain[m], bbs[m].model).items()}}
    assert "backbone1.layers.0.downsample.reduction.weight" in authors["state_dict"]
    path = tmp_path / "swin_t.pth"
    torch.save(authors, path)
    pre = load_for_finetune(str(path), "swin_tiny_patch4_window7", img_size=64)
    for m, b in bbs.items():  # the very tensors of the model it came from, in satfuse's layout
        got = pre.state_dicts[m]
        assert set(got) == set(b.state_dict())
        assert all(torch.equal(got[k], v) for k, v in b.state_dict().items())
    model = build_classifier([BranchSpec("s1", "s1"), BranchSpec("s2", "s2")], "swin_tiny_patch4_window7", 8,
                             False, pre.state_dicts, str(path), img_size=64)
    assert model.weight_notes == []  # already converted by the loader: nothing left to adapt
    with pytest.raises(SatfuseError, match=r"the s1 weights are a swin_tiny_patch4_window7, the config has "
                                           r"model\.backbone=resnet50"):
        load_for_finetune(str(path), "resnet50")
