"""Weights out and in: a ResNet-50 pretrained one step exports as torchvision state dicts and
as safetensors that load strictly into torchvision's layout, and fine-tunes back from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from satfuse.cli import main
from satfuse.config import from_dict
from satfuse.evaluation.finetune import FinetuneConfig, run_finetune
from satfuse.utils import SatfuseError
from tests.models.torchvision_reference import ReferenceResNet, expected_shapes

ROOT = Path(__file__).resolve().parents[2]
CHANNELS = {"s1": 2, "s2": 13}


@pytest.fixture(scope="module")
def r50_run(sen12ms_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Dual-SimCLR ResNet-50 pretrained for one step (32x32, batch 2, one rank)."""
    from satfuse.engines.pretrain import run_pretrain

    run = tmp_path_factory.mktemp("r50") / "run"
    code = run_pretrain(str(ROOT / "hpc" / "pretrain" / "tiny.yaml"), [
        f"data.shards={sen12ms_shards}", "data.batch_size=2", "data.crop=32", "data.num_workers=0",
        "model.backbone=resnet50", "model.proj_hidden=32", "model.proj_out=16", "train.steps=1",
        "train.device=cpu", f"train.run_dir={run}", "checkpoint.every_steps=1", "train.log_every=1"])
    assert code == 0
    return run


def _satfuse_backbones(run: Path) -> dict[str, torch.nn.Module]:
    from satfuse.checkpoint.export import default_builder, load_dcp_model, resolve_checkpoint

    model, _ = load_dcp_model(resolve_checkpoint(run), default_builder)
    return {k: m.eval() for k, m in model.backbones().items()}


def _check_torchvision(sds: dict[str, dict[str, torch.Tensor]], run: Path) -> None:
    assert set(sds) == {"s1", "s2"}
    ours = _satfuse_backbones(run)
    for name, sd in sds.items():
        want = expected_shapes("resnet50", CHANNELS[name])
        assert len(want) == 318  # torchvision resnet50's 320 tensors, fc aside
        assert {k: tuple(v.shape) for k, v in sd.items()} == want
        ref = ReferenceResNet("resnet50", CHANNELS[name]).eval()
        ref.load_state_dict(sd, strict=True)
        x = torch.randn(2, CHANNELS[name], 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(ref(x), ours[name](x), rtol=1e-5, atol=1e-6)


def test_export_torchvision_format(r50_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "dual_simclr_r50.pt"
    assert main(["ckpt", "export", str(r50_run), "--out", str(out), "--format", "torchvision"]) == 0
    sds = torch.load(out, map_location="cpu", weights_only=True)
    _check_torchvision(sds, r50_run)
    norm = json.loads((tmp_path / "dual_simclr_r50.normalization.json").read_text())
    assert norm["in_channels"] == CHANNELS and norm["backbone"] == "resnet50"
    assert len(norm["normalization"]["s2"]["mean"]) == 13 and norm["normalization"]["s1"]["clip"] == [-25.0, 0.0]


def test_export_safetensors_format(r50_run: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "dual_simclr_r50.safetensors"
    assert main(["ckpt", "export", str(r50_run), "--out", str(out), "--format", "safetensors"]) == 0
    with safe_open(str(out), framework="pt") as fh:
        flat = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        meta = fh.metadata()
    sds: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        head, _, rest = k.partition(".")
        sds.setdefault(head, {})[rest] = v
    _check_torchvision(sds, r50_run)
    norm = json.loads(meta["satfuse_normalization"])
    assert len(norm["normalization"]["s2"]["std"]) == 13


def test_default_export_format_is_unchanged(r50_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bb.pt"
    assert main(["ckpt", "export", str(r50_run), "--out", str(out)]) == 0
    doc = torch.load(out, weights_only=True)
    assert doc["format"] == "satfuse-backbones/1" and "conv1.weight" in doc["state_dicts"]["s2"]


def _ft_cfg(dfc_shards: dict[str, Path], run_dir: Path, **model) -> FinetuneConfig:
    raw = {"data": {"train_shards": str(dfc_shards["train"]), "test_shards": str(dfc_shards["test"]),
                    "crop": 32, "batch_size": 16, "eval_batch_size": 64},
           "model": {"backbone": "resnet50", "modalities": "s1s2", "fusion": "late", **model},
           "train": {"epochs": 1, "patience": 0, "seed": 1, "device": "cpu"}, "run_dir": str(run_dir)}
    return from_dict(FinetuneConfig, raw)


def test_finetune_round_trip_from_torchvision_file(r50_run: Path, dfc_shards: dict[str, Path],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "w.pt"
    assert main(["ckpt", "export", str(r50_run), "--out", str(out), "--format", "torchvision"]) == 0
    res = run_finetune(_ft_cfg(dfc_shards, tmp_path / "ft", checkpoint=str(out)))
    assert res["normalization"] == "checkpoint"  # from the JSON beside the weights
    assert res["checkpoint"]["branches"] == ["s1", "s2"]
    assert res["method"].startswith("Dual-SimCLR")
    assert 0.0 <= res["metrics"]["oa"] <= 1.0


def test_single_modality_file_and_refusals(r50_run: Path, dfc_shards: dict[str, Path], tmp_path: Path) -> None:
    from satfuse.evaluation.plain_weights import load_for_finetune

    out = tmp_path / "w.pt"
    assert main(["ckpt", "export", str(r50_run), "--out", str(out), "--format", "torchvision"]) == 0
    sds = torch.load(out, weights_only=True)
    s2 = dict(sds["s2"], **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(s2, tmp_path / "s2_only.pt")
    pre = load_for_finetune(str(tmp_path / "s2_only.pt"), "resnet50")
    assert set(pre.state_dicts) == {"s2"} and "fc.weight" not in pre.state_dicts["s2"]
    assert pre.normalization is None  # nothing beside it: the training shards' stats are used

    # the authors' release layout: {"state_dict": {"backbone1.*": S1, "backbone2.*": S2}}
    authors = {"epoch": 200, "arch": "resnet50", "state_dict": {
        **{f"backbone1.{k}": v for k, v in sds["s1"].items()},
        **{f"backbone2.{k}": v for k, v in sds["s2"].items()},
        "backbone1.fc.0.weight": torch.zeros(2048, 2048)}}
    torch.save(authors, tmp_path / "authors.pth")
    pre = load_for_finetune(str(tmp_path / "authors.pth"), "resnet50",
                            normalization=str(tmp_path / "w.normalization.json"))
    assert set(pre.state_dicts) == {"s1", "s2"} and pre.band_stats() is not None

    # ImageNet-like 3-band conv1 declared as S2: refused naming the tensor and both shapes
    rgb = dict(sds["s2"], **{"conv1.weight": torch.zeros(64, 3, 7, 7)})
    torch.save(rgb, tmp_path / "rgb.pt")
    with pytest.raises(SatfuseError, match=r"conv1\.weight has shape \(64, 3, 7, 7\).*\(64, 13, 7, 7\)"):
        load_for_finetune(str(tmp_path / "rgb.pt"), "resnet50", modality="s2")
    # a ResNet-50 file with a resnet18 config: refused naming both architectures
    with pytest.raises(SatfuseError, match="resnet50.*model.backbone=resnet18"):
        load_for_finetune(str(tmp_path / "s2_only.pt"), "resnet18")
    # a tensor whose shape differs (wrong width): named with both shapes
    bad = dict(sds["s2"], **{"layer1.0.bn1.weight": torch.zeros(32)})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(SatfuseError, match=r"layer1\.0\.bn1\.weight has shape \(32,\).*\(64,\)"):
        load_for_finetune(str(tmp_path / "bad.pt"), "resnet50")


def test_build_classifier_names_the_tensor_that_does_not_fit() -> None:
    from satfuse.evaluation.models import BranchSpec, build_classifier
    from satfuse.models.backbones import build_backbone

    sd = build_backbone("tiny", 3).state_dict()
    with pytest.raises(SatfuseError, match=r"conv1\.weight: checkpoint \(16, 3, 3, 3\) vs model \(16, 13, 3, 3\)"):
        build_classifier([BranchSpec("s2", "s2")], "tiny", 8, False, {"s2": sd}, "x")


def test_side_normalization_of_another_export_is_refused(r50_run: Path, tmp_path: Path) -> None:
    """X.pt and X.safetensors share X.normalization.json: the safetensors metadata wins over
    it, and a side file written for other weights or from another run is refused naming both."""
    from satfuse.evaluation.plain_weights import load_for_finetune

    out = tmp_path / "X.safetensors"
    assert main(["ckpt", "export", str(r50_run), "--out", str(out), "--format", "safetensors"]) == 0
    side = tmp_path / "X.normalization.json"
    doc = json.loads(side.read_text())
    embedded_mean = doc["normalization"]["s2"]["mean"]
    # the same export's side file with other values: the embedded ones are used
    doc["normalization"]["s2"]["mean"] = [m + 100.0 for m in embedded_mean]
    side.write_text(json.dumps(doc))
    pre = load_for_finetune(str(out), "resnet50")
    assert pre.normalization["s2"]["mean"] == embedded_mean and pre.method == "dual_simclr"
    # written for X.pt (a torchvision export of the same name)
    side.write_text(json.dumps({**doc, "weights": "X.pt"}))
    with pytest.raises(SatfuseError, match=r"X\.normalization\.json: belongs to another export than .*X\.safetensors "
                                           r"\(weights 'X\.pt' \(this file: 'X\.safetensors'\)\)"):
        load_for_finetune(str(out), "resnet50")
    # from another source run
    side.write_text(json.dumps({**doc, "source": "/elsewhere/run/checkpoints/step_00000009"}))
    with pytest.raises(SatfuseError, match=r"source '/elsewhere/run/checkpoints/step_00000009' \(this file: '.*step_0+1'\)"):
        load_for_finetune(str(out), "resnet50")
    # a plain .pt beside a side file written for the .safetensors: refused, not used quietly
    torch.save(_safetensors_as_dict(out), tmp_path / "X.pt")
    side.write_text(json.dumps({**doc, "weights": "X.safetensors"}))
    with pytest.raises(SatfuseError, match=r"weights 'X\.safetensors' \(this file: 'X\.pt'\)"):
        load_for_finetune(str(tmp_path / "X.pt"), "resnet50")


def _safetensors_as_dict(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    sds: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as fh:
        for k in fh.keys():  # noqa: SIM118
            head, _, rest = k.partition(".")
            sds.setdefault(head, {})[rest] = fh.get_tensor(k)
    return sds
