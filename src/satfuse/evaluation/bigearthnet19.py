"""BigEarthNet-19 multi-label scene classification (registered `bigearthnet19`).

The 19-class nomenclature of Sumbul et al. (BigEarthNet-MM v1.0, and reBEN / v2.0 whose
metadata gives the 19 classes directly); the labels are the sample JSON's `labels19`
multi-hot, which `satfuse shard --dataset bigearthnet|bigearthnet-v2` writes (v1: mapped from
the 43 CORINE classes, `satfuse.data.sources.bigearthnet.OLD2NEW`). Official splits: one shard
set per `--split train|val|test`; the val set is the early-stopping set (`data.val_shards`).
Multi-label only, as every paper reports it; metrics as the literature reports them: mAP
macro (`map`) and micro (`map_micro`), F1 macro and micro at threshold 0.5.

S2 has 12 bands (no B10); `satfuse.evaluation.data` places them in the 13-band order the
models take, B10 a zero (mean) channel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from satfuse.data.sources.bigearthnet import CLASSES_19
from satfuse.evaluation.benchmark import Benchmark
from satfuse.evaluation.metrics import micro_average_precision
from satfuse.registry import BENCHMARKS


@BENCHMARKS.register("bigearthnet19")
class BigEarthNet19(Benchmark):
    """BigEarthNet-19 (v1 or v2 shards), multi-label over 19 classes."""

    name, title, dataset = "bigearthnet19", "BigEarthNet-19", "bigearthnet"
    splits = {"train": "official train split (--split train)", "val": "official validation split (--split val)",
              "test": "official test split (--split test)"}
    label_members = ()
    class_names = CLASSES_19
    tasks = ("multi",)
    metrics = {"multi": "map"}
    label_source = "vector"
    datasets = ("bigearthnet", "bigearthnet-v2")
    shard_splits = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
    shard_command = ("satfuse shard --dataset bigearthnet|bigearthnet-v2 --split train|val|test "
                     "(without --no-labels), one shard set per split")

    report_columns = {"multi": (("map", "mAP (macro)"), ("map_micro", "mAP (micro)"), ("f1_macro", "F1 (macro)"),
                                ("f1_micro", "F1 (micro)"))}

    @classmethod
    def label_vector(cls, meta: dict[str, Any]) -> np.ndarray | None:
        labels = meta.get("labels19")
        if not isinstance(labels, list) or len(labels) != len(CLASSES_19):
            return None
        return np.asarray(labels, dtype=np.float32)

    @classmethod
    def extra_metrics(cls, task: str, y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        return {"map_micro": micro_average_precision(y_true, scores)}
