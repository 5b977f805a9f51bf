"""`satfuse ckpt ls | inspect | export` and the consolidated backbone export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from satfuse.checkpoint import commands
from satfuse.checkpoint.export import EXPORT_FORMAT, export_backbones, load_backbones
from satfuse.utils import SatfuseError
from tests.checkpoint.conftest import Reference
from tests.checkpoint.toy_train import build_toy


def ckpt_cli(argv: list[str]) -> int:
    """The `ckpt` command exactly as registered into the satfuse CLI."""
    parser = argparse.ArgumentParser(prog="satfuse")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ckpt", *map(str, argv)])
    return args.func(args)


def test_ls_marks_latest_and_broken(ref_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ref_copy / "checkpoints/step_00000020/rank_00001.pt").unlink()
    assert ckpt_cli(["ls", ref_copy]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()[:1].isdigit()}
    assert set(lines) == {"16", "20", "24"}
    assert "<- latest" in lines["24"] and "yes" in lines["24"] and " 2 " in lines["24"]
    assert "NO" in lines["20"] and "rank_00001.pt is missing" in out


def test_ls_of_a_non_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SatfuseError, match="no checkpoints/ directory"):
        ckpt_cli(["ls", tmp_path])


def test_inspect_complete_and_incomplete(ref_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ckpt_cli(["inspect", ref_copy / "checkpoints/step_00000024"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["complete"] and rep["step"] == 24 and rep["world_size"] == 2
    assert rep["parameters"] == sum(p.numel() for p in build_toy({}).parameters())
    assert "rank_00001.pt" in rep["files"] and rep["total_bytes"] > 0
    shard = ref_copy / "checkpoints/step_00000024/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])
    assert ckpt_cli(["inspect", ref_copy / "checkpoints/step_00000024"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert not rep["complete"] and any("__0_0.distcp" in p for p in rep["problems"])


def test_export_is_loadable_without_torch_distributed(reference: Reference, tmp_path: Path) -> None:
    out = tmp_path / "backbone.pt"
    ckpt = reference.run_dir / "checkpoints/step_00000024"
    summary = export_backbones(ckpt, out, builder=build_toy)
    assert summary["step"] == 24 and summary["backbones"] == ["s1", "s2"]
    doc = torch.load(out, weights_only=True)
    assert doc["format"] == EXPORT_FORMAT and doc["in_channels"] == {"s1": 2, "s2": 6}
    assert doc["source"] == str(ckpt) and doc["step"] == 24
    final = torch.load(reference.final, weights_only=True)["model"]  # rank 0 after step 24
    for name in ("s1", "s2"):
        for key, tensor in doc["state_dicts"][name].items():
            assert torch.equal(tensor, final[f"{name}.{key}"]), f"{name}.{key}"
    # and the backbone drops into a fresh module
    fresh = build_toy({})
    fresh.s1.load_state_dict(load_backbones(out)["state_dicts"]["s1"])


def test_export_cli_with_builder_and_bad_inputs(reference: Reference, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = reference.run_dir / "checkpoints/step_00000024"
    out = tmp_path / "b.pt"
    assert ckpt_cli(["export", ckpt, "--out", out, "--builder", "tests.checkpoint.toy_train:build_toy"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] > 0 and out.is_file()
    with pytest.raises(SatfuseError, match="not a checkpoint directory"):
        export_backbones(tmp_path / "missing", out, builder=build_toy, overwrite=True)
    with pytest.raises(SatfuseError, match="MODULE:FUNCTION"):
        ckpt_cli(["export", ckpt, "--out", out, "--builder", "nocolon"])
    with pytest.raises(SatfuseError, match="no config.model section"):
        export_backbones(ckpt, out, overwrite=True)  # the toy run stored no pretraining config
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(SatfuseError, match="not a readable backbone export"):
        load_backbones(bad)


def test_export_of_a_real_pretraining_model_with_the_default_builder(tmp_path: Path) -> None:
    """The path `satfuse ckpt export` takes for `satfuse pretrain` checkpoints: the model is
    rebuilt from meta.json's config (satfuse.models.build_pretrain_model)."""
    from satfuse.checkpoint.manager import CheckpointManager
    from satfuse.checkpoint.state import ModelOptimState
    from satfuse.config import ModelConfig, PretrainConfig, to_dict
    from satfuse.models import build_pretrain_model

    cfg = PretrainConfig(model=ModelConfig(backbone="tiny", proj_hidden=32, proj_out=16))
    torch.manual_seed(5)
    model = build_pretrain_model(cfg.model)
    norm = {"s1": {"mean": [0.1, 0.2]}, "s2": {"mean": [1.0] * 13}}
    path = CheckpointManager(tmp_path / "run").save(
        7, {"model_optim": ModelOptimState(model)}, {}, {"config": to_dict(cfg), "normalization": norm})
    out = tmp_path / "backbone.pt"
    assert ckpt_cli(["export", path, "--out", out]) == 0
    doc = load_backbones(out)
    assert doc["method"] == "dual_simclr" and doc["backbone"] == "tiny" and doc["step"] == 7
    assert doc["normalization"] == norm
    assert doc["in_channels"] == {k: int(v) for k, v in model.in_channels().items()}
    for name, module in model.backbones().items():
        for key, tensor in module.state_dict().items():
            assert torch.equal(doc["state_dicts"][name][key], tensor), f"{name}.{key}"


def test_inspect_of_a_dir_without_checkpoints_says_so(tmp_path: Path, ref_copy: Path) -> None:
    """A run dir with nothing saved used to be reported as "the save never finished (killed or
    failed)"; a step dir whose save did not finish still is."""
    run = tmp_path / "fresh"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SatfuseError, match=r"fresh: not a checkpoint .*nothing was saved here yet") as raised:
        ckpt_cli(["inspect", run])
    assert "never finished" not in str(raised.value) and "\n" not in str(raised.value)
    (ref_copy / "checkpoints" / "latest").unlink()
    with pytest.raises(SatfuseError, match=r"holds checkpoints/step_00000016, checkpoints/step_00000020, "
                                           r"checkpoints/step_00000024 but no latest: pass one of them"):
        ckpt_cli(["inspect", ref_copy])
    (ref_copy / "checkpoints/step_00000024/meta.json").unlink()
    assert ckpt_cli(["inspect", ref_copy / "checkpoints/step_00000024"]) == 1  # a real unfinished save: reported
