"""A toy backbone and a toy downstream benchmark, registered from outside src/ (issue 26 item 2).

Loaded by the entry points through `SATFUSE_PLUGINS=tests.extensions.toy_models`; each follows
the recipe in docs/architecture.md: subclass the contract, register the class.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from satfuse.evaluation.benchmark import Benchmark
from satfuse.evaluation.targets import IGNORE
from satfuse.models.backbones import Backbone
from satfuse.registry import BACKBONES, BENCHMARKS

TOY_WIDTH = 12  # channels after the toy stem (its weight is (TOY_WIDTH, bands, 3, 3))


@BACKBONES.register("toy_net")
class ToyNet(Backbone):
    """Two strided 3x3 convs: a 16x16 crop leaves a 4x4 map (MMA-ready), 24 features."""

    feature_dim = 24
    input_weight = "toy_stem.weight"

    def __init__(self, in_channels: int, zero_init_residual: bool = False) -> None:
        super().__init__(in_channels, zero_init_residual)
        self.toy_stem = nn.Conv2d(in_channels, TOY_WIDTH, 3, stride=2, padding=1)
        self.toy_mix = nn.Conv2d(TOY_WIDTH, self.feature_dim, 3, stride=2, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.toy_mix(torch.relu(self.toy_stem(x)))


# DFC2020 code -> toy class: 10 (Water) -> 0 "water", every other class -> 1 "land", 0 -> ignored
_DFC_TO_TOY = np.full(256, IGNORE, dtype=np.uint8)
_DFC_TO_TOY[1:10] = 1
_DFC_TO_TOY[10] = 0


@BENCHMARKS.register("toy_water")
class ToyWater(Benchmark):
    """Water or land, read from the DFC2020 `dfc` member; single-label only, scored by OA."""

    name, title, dataset = "toy_water", "Toy water/land", "dfc2020"
    splits = {"train": "the DFC2020 validation split", "test": "the DFC2020 test split"}
    label_members = ("dfc",)
    class_names = ("water", "land")
    tasks = ("single",)
    metrics = {"single": "oa"}

    @classmethod
    def label_map(cls, member: str, array: np.ndarray) -> np.ndarray:
        return _DFC_TO_TOY[np.asarray(array, dtype=np.uint8)[0]]
