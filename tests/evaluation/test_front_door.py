"""Downstream commands as the README gives them (issue 21 items 2, 3, 6, 8; issue 19 items 9, 10).

One naming of the DFC2020 shard dirs; one directory per run by default, never a silent
overwrite; every form of a checkpoint accepted; the same seed gives the same run whatever
form the checkpoint takes; SimCLR's single S1+S2 backbone is recorded as the early fusion it
is; a head that does not learn is named with its lr.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from satfuse.cli import main
from satfuse.config import from_dict, read_yaml
from satfuse.evaluation.finetune import FinetuneConfig, run_finetune
from satfuse.evaluation.pretrained import load_pretrained
from satfuse.utils import SatfuseError
from tests.evaluation.helpers import make_export

ROOT = Path(__file__).resolve().parents[2]
NORM = {"s1": {"mean": [-12.0, -19.0], "std": [3.0, 3.5], "clip": [-25.0, 0.0]},
        "s2": {"mean": [1500.0] * 13, "std": [500.0] * 13, "clip": [0.0, 10000.0]}}


def _raw(shards, **sections) -> dict:
    raw = {"data": {"train_shards": str(shards["train"]), "test_shards": str(shards["test"]), "crop": 24,
                    "batch_size": 16, "min_epoch_samples": 48, "eval_batch_size": 64},
           "model": {"backbone": "tiny", "checkpoint": "none", "modalities": "s2"},
           "train": {"epochs": 2, "patience": 0, "lr": 3e-3, "backbone_lr": 3e-3, "seed": 1}}
    for sec, vals in sections.items():
        raw[sec].update(vals) if isinstance(vals, dict) else raw.__setitem__(sec, vals)
    return raw


def _cfg(shards, **sections) -> FinetuneConfig:
    return from_dict(FinetuneConfig, _raw(shards, **sections))


@pytest.fixture
def dcp_run(tmp_path) -> Path:
    """A real DCP pretraining checkpoint (run/checkpoints/step_5 + latest), tiny Dual-SimCLR."""
    from satfuse.checkpoint.manager import CheckpointManager
    from satfuse.checkpoint.state import ModelOptimState
    from satfuse.config import ModelConfig, to_dict
    from satfuse.models import build_pretrain_model

    mcfg = ModelConfig(method="dual_simclr", backbone="tiny", proj_hidden=32, proj_out=16)
    torch.manual_seed(3)
    model = build_pretrain_model(mcfg)
    opt = torch.optim.Adam(model.parameters())
    meta = {"config": {"model": to_dict(mcfg)}, "normalization": NORM}
    CheckpointManager(tmp_path / "run").save(5, {"model_optim": ModelOptimState(model, opt)}, {}, meta)
    return tmp_path / "run"


# ------------------------------------------------------------------ item 2: one shard naming
def test_dfc2020_shard_dirs_are_named_alike_in_readme_configs_and_demo():
    readme = (ROOT / "README.md").read_text()
    outs = list(dict.fromkeys(re.findall(r"satfuse shard --src data/dfc2020 .*?--out (\S+)", readme)))
    assert len(outs) == 2, outs  # one naming wherever the README shards DFC2020
    cfg = read_yaml(ROOT / "hpc/finetune/dfc2020.yaml")["data"]
    assert [cfg["train_shards"], cfg["test_shards"]] == outs
    defaults = FinetuneConfig().data
    assert [defaults.train_shards, defaults.test_shards] == outs
    demo = read_yaml(ROOT / "hpc/finetune/demo.yaml")["data"]
    assert [Path(demo["train_shards"]).name, Path(demo["test_shards"]).name] == [Path(o).name for o in outs]
    assert '"dfc2020-train"' in (ROOT / "src/satfuse/demo.py").read_text()


# ------------------------------------------------------------------ item 3: a directory per run
def test_runs_without_run_dir_get_their_own_directory_and_never_overwrite(dfc_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = run_finetune(_cfg(dfc_shards, model={"modalities": "s1"}))
    b = run_finetune(_cfg(dfc_shards, model={"modalities": "s2"}))
    c = run_finetune(_cfg(dfc_shards, model={"modalities": "s2"}, train={"seed": 2}))
    dirs = [Path(r["config"]["run_dir"]) for r in (a, b, c)]
    assert dirs[0] == Path("runs/finetune/supervised_s1/single/frac1/seed1")
    assert len(set(dirs)) == 3 and all((d / "result.json").is_file() for d in dirs)
    before = (dirs[1] / "result.json").read_text()
    with pytest.raises(SatfuseError, match="exists.*--overwrite"):
        run_finetune(_cfg(dfc_shards, model={"modalities": "s2"}))
    assert (dirs[1] / "result.json").read_text() == before
    explicit = _cfg(dfc_shards, model={"modalities": "s1"}, run_dir=str(dirs[1]))
    with pytest.raises(SatfuseError, match="--overwrite"):
        run_finetune(explicit)
    assert (dirs[1] / "result.json").read_text() == before
    run_finetune(explicit, overwrite=True)
    assert json.loads((dirs[1] / "result.json").read_text())["modalities"] == "s1"


def test_cli_finetune_refuses_overwrite_and_report_reads_both_runs(dfc_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--train-shards", str(dfc_shards["train"]), "--test-shards", str(dfc_shards["test"]),
              "--backbone", "tiny", "--epochs", "1", "data.crop=24", "data.min_epoch_samples=32"]
    assert main(["finetune", "--modalities", "s1", *common]) == 0
    assert main(["finetune", "--modalities", "s1s2", "--fusion", "late", "--task", "multi", *common]) == 0
    assert main(["finetune", "--modalities", "s1", *common]) == 2  # the first run's result stays
    assert main(["finetune", "--modalities", "s1", *common, "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["report", "runs/finetune", "--out", "reports/mine"]) == 0
    assert json.loads(capsys.readouterr().out)["n_runs"] == 2


# ------------------------------------------------------------------ item 6: every checkpoint form
def test_every_form_of_a_checkpoint_is_accepted(dcp_run, capsys):
    ckpts = dcp_run / "checkpoints"
    step = ckpts / (ckpts / "latest").read_text().strip()
    forms = [step, ckpts / "latest", ckpts, dcp_run]
    loaded = [load_pretrained(p) for p in forms]
    for pre in loaded[1:]:
        assert pre.step == loaded[0].step == 5
        assert all(torch.equal(pre.state_dicts["s1"][k], v) for k, v in loaded[0].state_dicts["s1"].items())
    for p in forms:
        capsys.readouterr()
        assert main(["ckpt", "inspect", str(p), "--quick"]) == 0, p
        report = json.loads(capsys.readouterr().out)
        assert report["complete"] is True and report["step"] == 5 and report["path"] == str(step)


# ------------------------------------------------------------------ issue 19 item 9
def test_same_seed_same_run_from_checkpoint_dir_or_export(dfc_shards, dcp_run, tmp_path):
    from satfuse.checkpoint.export import export_backbones

    export = tmp_path / "backbone.pt"
    export_backbones(dcp_run / "checkpoints" / "latest", export)
    res = []
    for i, ckpt in enumerate([export, dcp_run / "checkpoints" / "latest"]):
        cfg = _cfg(dfc_shards, model={"checkpoint": str(ckpt), "modalities": "s1s2"}, run_dir=str(tmp_path / f"r{i}"))
        res.append(run_finetune(cfg))
    assert res[0]["metrics"] == res[1]["metrics"]
    assert res[0]["curves"]["train_loss"] == res[1]["curves"]["train_loss"]


# ------------------------------------------------------------------ issue 19 item 10
def test_simclr_s1s2_with_late_fusion_records_what_ran(dfc_shards, tmp_path, caplog):
    export = make_export(tmp_path / "simclr.pt", method="simclr", in_channels={"shared": 15})
    cfg = _cfg(dfc_shards, model={"checkpoint": str(export), "modalities": "s1s2", "fusion": "late"},
               train={"epochs": 1}, run_dir=str(tmp_path / "r"))
    with caplog.at_level(logging.WARNING, logger="satfuse"):
        res = run_finetune(cfg)
    assert res["fusion"] == "early" and res["config"]["model"]["fusion"] == "early"
    assert read_yaml(tmp_path / "r" / "config.yaml")["model"]["fusion"] == "early"
    assert "model.fusion=late asked" in caplog.text


# ------------------------------------------------------------------ item 8: a head that does not learn
def test_head_whose_loss_does_not_fall_warns_naming_the_lr(dfc_shards, tmp_path, caplog):
    cfg = _cfg(dfc_shards, train={"lr": 1e-9, "backbone_lr": 1e-9, "epochs": 3}, run_dir=str(tmp_path / "slow"))
    with caplog.at_level(logging.WARNING, logger="satfuse"):
        res = run_finetune(cfg)
    assert "training loss did not fall" in caplog.text and "train.lr=1e-09" in caplog.text
    assert res["warnings"] and "train.lr=1e-09" in res["warnings"][0]
    caplog.clear()
    ok = run_finetune(_cfg(dfc_shards, train={"epochs": 3}, run_dir=str(tmp_path / "ok")))
    assert ok["warnings"] == [] and "did not fall" not in caplog.text


# ------------------------------------------------------------------ issue 29 item 3: one owner per run dir
def test_finetune_refuses_a_pretraining_run_dir_shards_and_a_source_tree(dfc_shards, dcp_run, tmp_path, capsys):
    """--run-dir into another kind's directory is refused in one line before anything is
    written there: a pretraining run keeps its config.yaml and gets no fine-tuning curves."""
    from satfuse.config import PretrainConfig, dump_yaml

    dump_yaml(PretrainConfig(), dcp_run / "config.yaml")
    before = (dcp_run / "config.yaml").read_bytes()
    common = ["--train-shards", str(dfc_shards["train"]), "--test-shards", str(dfc_shards["test"]),
              "--backbone", "tiny", "--epochs", "1", "--modalities", "s1", "data.crop=24", "log.tensorboard=true"]
    capsys.readouterr()
    assert main(["finetune", "--run-dir", str(dcp_run), "--overwrite", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{dcp_run}: holds a pretraining run (checkpoints, config.yaml), not a fine-tuning run" in err[0]
    assert "pass another --run-dir" in err[0]
    assert (dcp_run / "config.yaml").read_bytes() == before and not (dcp_run / "tensorboard").exists()
    shards = tmp_path / "shards"
    (shards / ".satfuse").mkdir(parents=True)
    (shards / "manifest.json").write_text("{}")
    tree = tmp_path / "tree"
    (tree / "ROIs1158_spring" / "s1_1").mkdir(parents=True)
    (tree / "ROIs1158_spring" / "s1_1" / "ROIs1158_spring_s1_1_p1.tif").write_bytes(b"")
    for where, what in ((shards, r"shard set \(manifest\.json, \.satfuse\)"),
                        (tree, r"source tree \(GeoTIFFs such as ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p1\.tif\)")):
        with pytest.raises(SatfuseError, match=what):
            run_finetune(_cfg(dfc_shards, run_dir=str(where)))
        assert not (where / "config.yaml").exists()
