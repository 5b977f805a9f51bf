"""SEN12MS scene classification as its authors define it (registered `sen12ms-igbp`).

schmitt-muc/SEN12MS `classification/dataset.py`: each patch's 17 IGBP class fractions
(`labels/IGBP_probability_labels.pkl`, packed into the sample JSON's `igbp` by `satfuse shard
--dataset sen12ms --labels PATH`) are simplified to 10 classes - sums of IGBP [0:5] (forest),
[5:7] (shrubland), [7:9] (savanna), then 9 (grassland), 10 (wetlands), 11+13 (croplands),
12 (urban), 14 (snow/ice), 15 (barren), 16 (water); single-label = argmax of the simplified
vector, multi-label = simplified fraction >= 0.1 (`data.multi_label_min_fraction`). Splits:
the authors' `train_list.txt` / `test_list.txt` (`satfuse shard --split-file`). Metrics:
OA, AA, macro F1 (single); macro/micro F1 and mAP (multi), plus micro mAP.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from satfuse.data.sources.igbp_labels import N_IGBP
from satfuse.evaluation.benchmark import Benchmark
from satfuse.evaluation.metrics import micro_average_precision
from satfuse.registry import BENCHMARKS

CLASS_NAMES_10 = ("Forest", "Shrubland", "Savanna", "Grassland", "Wetlands", "Croplands", "Urban/Built-up",
                  "Snow/Ice", "Barren", "Water")
# IGBP index (0..16) -> simplified class (0..9), the authors' sums
_SIMPLE = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 5, 7, 8, 9])


def simplify_igbp(fractions: np.ndarray) -> np.ndarray:
    """(..., 17) IGBP fractions -> (..., 10) simplified class fractions (the authors' sums)."""
    fr = np.asarray(fractions, dtype=np.float64)
    out = np.zeros((*fr.shape[:-1], len(CLASS_NAMES_10)))
    for i, c in enumerate(_SIMPLE):
        out[..., c] += fr[..., i]
    return out


@BENCHMARKS.register("sen12ms-igbp")
class Sen12msIgbp(Benchmark):
    """SEN12MS scene classification: 10 simplified IGBP classes, single- and multi-label."""

    name, title, dataset = "sen12ms-igbp", "SEN12MS-IGBP", "sen12ms"
    splits = {"train": "the authors' train_list.txt (--split-file)", "test": "the authors' test_list.txt (--split-file)"}
    label_members = ()
    class_names = CLASS_NAMES_10
    metrics = {"single": "aa", "multi": "f1_macro"}
    label_source = "vector"
    datasets = ("sen12ms",)
    shard_command = ("satfuse shard --dataset sen12ms --labels SRC/labels/IGBP_probability_labels.pkl "
                     "--split-file SRC/train_list.txt|test_list.txt")

    report_columns = {"single": (("oa", "OA"), ("aa", "AA"), ("f1_macro", "F1 (macro)")),
                      "multi": (("f1_macro", "F1 (macro)"), ("f1_micro", "F1 (micro)"), ("map", "mAP (macro)"),
                                ("map_micro", "mAP (micro)"))}

    @classmethod
    def label_vector(cls, meta: dict[str, Any]) -> np.ndarray | None:
        igbp = meta.get("igbp")
        if not isinstance(igbp, list) or len(igbp) != N_IGBP:
            return None
        return simplify_igbp(np.asarray(igbp, dtype=np.float64)).astype(np.float32)

    @classmethod
    def extra_metrics(cls, task: str, y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        return {"map_micro": micro_average_precision(y_true, scores)} if task == "multi" else {}
