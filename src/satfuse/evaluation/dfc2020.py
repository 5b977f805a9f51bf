"""DFC2020 land-cover classification, the paper's downstream benchmark (registered `dfc2020`).

Train on the DFC2020 *validation* split, test on its *test* split (the authors' protocol);
labels from the `dfc` member (DFC2020 classes), or `lc` (SEN12MS IGBP, mapped through DFC) for
SEN12MS-style shards with land cover; the authors' 8 classes (`satfuse.evaluation.targets`).
"""

from __future__ import annotations

import numpy as np

from satfuse.evaluation.benchmark import Benchmark
from satfuse.evaluation.targets import CLASS_NAMES, label_map_from_member
from satfuse.registry import BENCHMARKS


@BENCHMARKS.register("dfc2020")
class DFC2020(Benchmark):
    """The authors' DFC2020 scene classification (8 classes, single- and multi-label)."""

    name, title, dataset = "dfc2020", "DFC2020", "dfc2020"
    splits = {"train": "validation split (ROIs0000_validation; the authors train on it)",
              "test": "test split (ROIs0000_test)"}
    label_members = ("dfc", "lc")
    class_names = CLASS_NAMES
    metrics = {"single": "aa", "multi": "f1_macro"}

    @classmethod
    def label_map(cls, member: str, array: np.ndarray) -> np.ndarray:
        return label_map_from_member(member, array)
