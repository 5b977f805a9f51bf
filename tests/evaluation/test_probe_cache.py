"""Linear probes on cached frozen features (`model.feature_cache`): one feature pass per shard
set over a whole fraction x seed grid, the probe still learns, a damaged cache is recomputed."""

from __future__ import annotations

import logging

import pytest

from satfuse.config import from_dict
from satfuse.evaluation import probe_cache
from satfuse.evaluation.finetune import FinetuneConfig, run_finetune
from satfuse.utils import SatfuseError
from tests.evaluation.helpers import make_export


def _cfg(shards, run_dir, export, cache, mode="linear", frac=1.0, seed=1) -> FinetuneConfig:
    return from_dict(FinetuneConfig, {
        "data": {"train_shards": str(shards["train"]), "test_shards": str(shards["test"]), "crop": 24,
                 "batch_size": 16, "min_epoch_samples": 48, "eval_batch_size": 64, "label_fraction": frac},
        "model": {"backbone": "tiny", "checkpoint": str(export), "mode": mode, "modalities": "s1s2",
                  "fusion": "late", "feature_cache": str(cache)},
        "train": {"epochs": 3, "patience": 0, "lr": 3e-2, "seed": seed}, "run_dir": str(run_dir)})


def test_features_once_per_shard_set_across_fractions_and_seeds(dfc_shards, tmp_path, caplog):
    export, cache = make_export(tmp_path / "dual.pt"), tmp_path / "features"
    probe_cache.FEATURE_PASSES.clear()
    results = {}
    for frac in (0.5, 1.0):
        for seed in (1, 2):
            results[frac, seed] = run_finetune(_cfg(dfc_shards, tmp_path / f"r{frac}-{seed}", export, cache,
                                                    frac=frac, seed=seed))
    # 4 runs, one pass per shard set (train, test); the val part is rows of the train features
    assert dict(probe_cache.FEATURE_PASSES) == {"train": 1, "test": 1}
    assert len(list(cache.glob("*.npz"))) == 2 and not list(cache.glob("*tmp*"))
    full = results[1.0, 1]
    assert full["n_train"] > results[0.5, 1]["n_train"]
    assert full["curves"]["train_loss"][-1] < full["curves"]["train_loss"][0]  # the head learns
    assert full["n_trainable"] < full["n_params"]  # the backbones stayed frozen

    # same run again from the cache: same numbers; a damaged file is recomputed with a warning
    again = run_finetune(_cfg(dfc_shards, tmp_path / "again", export, cache))
    assert again["metrics"] == full["metrics"]
    for f in cache.glob("train-*.npz"):
        f.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="satfuse.evaluation.probe_cache"):
        fixed = run_finetune(_cfg(dfc_shards, tmp_path / "fixed", export, cache))
    assert "feature cache unusable" in caplog.text
    assert probe_cache.FEATURE_PASSES["train"] == 2 and fixed["metrics"] == full["metrics"]
    other = make_export(tmp_path / "other.pt", seed=5)  # other weights: other files, never the old ones
    run_finetune(_cfg(dfc_shards, tmp_path / "other", other, cache))
    assert probe_cache.FEATURE_PASSES["train"] == 3 and len(list(cache.glob("*.npz"))) == 4

    with pytest.raises(SatfuseError, match="only for model.mode=linear"):
        run_finetune(_cfg(dfc_shards, tmp_path / "ft", export, cache, mode="finetune"))
