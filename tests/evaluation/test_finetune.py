"""Short end-to-end downstream runs on tiny synthetic DFC shards (real backbones, real data path)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from satfuse.config import from_dict
from satfuse.evaluation.finetune import (
    FinetuneConfig,
    Trainer,
    band_stats,
    build_model,
    prepare_data,
    run_finetune,
)
from satfuse.utils import SatfuseError
from tests.evaluation.helpers import make_export, write_dfc_shards


def _cfg(shards, run_dir, **sections) -> FinetuneConfig:
    raw = {"data": {"train_shards": str(shards["train"]), "test_shards": str(shards["test"]), "crop": 24,
                    "batch_size": 16, "min_epoch_samples": 48, "eval_batch_size": 64},
           "model": {"backbone": "tiny", "checkpoint": "none", "modalities": "s2"},
           "train": {"epochs": 4, "patience": 0, "lr": 3e-3, "backbone_lr": 3e-3, "seed": 1},
           "run_dir": str(run_dir)}
    for sec, vals in sections.items():
        raw.setdefault(sec, {}).update(vals) if isinstance(vals, dict) else raw.__setitem__(sec, vals)
    return from_dict(FinetuneConfig, raw)


def test_supervised_run_learns_and_writes_result(dfc_shards, tmp_path):
    res = run_finetune(_cfg(dfc_shards, tmp_path / "run", train={"epochs": 6}))
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["metrics"] == res["metrics"]
    assert saved["method"] == "Supervised S2" and saved["task"] == "single"
    # 96 train patches, 12 per class, 20 % held out per class -> 10 per class remain
    assert saved["n_val"] == 16 and saved["n_train"] == 80 and saved["n_test"] == 64
    assert saved["classes_missing_in_train"] == []
    assert len(saved["curves"]["train_loss"]) == saved["epochs_run"] == 6
    assert saved["curves"]["train_loss"][-1] < saved["curves"]["train_loss"][0]
    assert saved["metrics"]["aa"] > 0.4  # 8 classes: chance is 0.125
    assert len(saved["per_class"]["recall"]) == 8
    assert saved["normalization"] == "train_manifest"
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_linear_probe_freezes_backbones_finetune_moves_them(dfc_shards, tmp_path):
    export = make_export(tmp_path / "dual.pt")
    pre = torch.load(export, weights_only=True)["state_dicts"]
    for mode, should_move in (("linear", False), ("finetune", True)):
        cfg = _cfg(dfc_shards, tmp_path / mode, model={"checkpoint": str(export), "mode": mode,
                                                       "modalities": "s1s2", "fusion": "late"},
                   train={"epochs": 2})
        model, pre_stats, info = build_model(cfg.model, cfg.train.seed)
        head0 = model.head.weight.detach().clone()
        prep = prepare_data(cfg.data, cfg.train.seed)
        stats, _ = band_stats(cfg.data, prep.train, pre_stats)
        Trainer(cfg, model, prep, stats, torch.device("cpu")).fit()
        sd = model.backbones[0].state_dict()  # includes BatchNorm running statistics
        same = all(torch.equal(sd[k], pre["s1"][k]) for k in sd)
        assert same != should_move, mode
        assert not torch.equal(model.head.weight, head0)
        assert info["method"] == "dual_simclr"


def test_pretrained_run_uses_checkpoint_normalisation_and_multilabel(dfc_shards, tmp_path):
    norm = {"s1": {"mean": [-15.0, -21.0], "std": [5.0, 5.0], "clip": [-25.0, 0.0]},
            "s2": {"mean": [3000.0] * 13, "std": [1500.0] * 13, "clip": [0.0, 10000.0]}}
    export = make_export(tmp_path / "dual.pt", normalization=norm)
    res = run_finetune(_cfg(dfc_shards, tmp_path / "m", model={"checkpoint": str(export), "modalities": "s1s2"},
                            train={"task": "multi", "epochs": 2}))
    assert res["normalization"] == "checkpoint"
    assert res["method"] == "Dual-SimCLR (fine-tune)"
    for key in ("f1_macro", "f1_micro", "precision_macro", "recall_micro", "map"):
        assert 0.0 <= res["metrics"][key] <= 1.0
    assert res["checkpoint"]["step"] == 7


def test_fraction_missing_a_class_is_stated(tmp_path, dfc_shards):
    train = write_dfc_shards(tmp_path / "no_water", 40, 32, seed=5, dominant=[1, 2, 4, 5])
    shards = {"train": train, "test": dfc_shards["test"]}
    res = run_finetune(_cfg(shards, tmp_path / "r", data={"label_fraction": 0.25}, train={"epochs": 1}))
    assert "Water" in res["classes_missing_in_train"] and "Forest" not in res["classes_missing_in_train"]
    assert res["class_counts_train"][0] == 2  # 10 Forest, 2 held out, ceil(0.25 * 8) = 2
    assert res["per_class"]["recall"][7] == 0.0  # never trained on Water: never right


def test_bad_inputs_are_clear_errors(tmp_path, dfc_shards):
    empty = write_dfc_shards(tmp_path / "empty_test", 0, 32, seed=0)
    with pytest.raises(SatfuseError, match="manifest lists no shards; re-shard"):
        run_finetune(_cfg({"train": dfc_shards["train"], "test": empty}, tmp_path / "e"))
    with pytest.raises(SatfuseError, match="larger than"):
        run_finetune(_cfg(dfc_shards, tmp_path / "c", data={"crop": 48}))
    export = make_export(tmp_path / "dual.pt")
    with pytest.raises(SatfuseError, match="backbone: checkpoint 'tiny' vs config model.backbone='resnet18'"):
        run_finetune(_cfg(dfc_shards, tmp_path / "b", model={"checkpoint": str(export), "backbone": "resnet18"}))
    assert not (tmp_path / "b" / "result.json").exists()


def test_same_seed_same_result(dfc_shards, tmp_path):
    a = run_finetune(_cfg(dfc_shards, tmp_path / "a", model={"modalities": "s1"}, train={"epochs": 1}))
    b = run_finetune(_cfg(dfc_shards, tmp_path / "b", model={"modalities": "s1"}, train={"epochs": 1}))
    assert a["metrics"] == b["metrics"]
    assert np.allclose(a["curves"]["train_loss"], b["curves"]["train_loss"])
