"""Fine-tuning writes its curves to TensorBoard with log.tensorboard=true."""

from __future__ import annotations

from satfuse.config import from_dict
from satfuse.evaluation.finetune import FinetuneConfig, run_finetune


def test_finetune_tensorboard_curves(dfc_shards, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = {"data": {"train_shards": str(dfc_shards["train"]), "test_shards": str(dfc_shards["test"]),
                    "crop": 24, "batch_size": 16, "eval_batch_size": 64},
           "model": {"backbone": "tiny", "checkpoint": "none", "modalities": "s2"},
           "train": {"epochs": 2, "patience": 0, "seed": 1}, "run_dir": str(tmp_path / "run"),
           "log": {"tensorboard": True}}
    run_finetune(from_dict(FinetuneConfig, raw))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    for tag in ("finetune/train_loss", "finetune/val_loss", "finetune/val_metric", "finetune/lr_head"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag
