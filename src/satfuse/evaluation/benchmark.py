"""The downstream-benchmark contract, and finding a registered benchmark by name.

A benchmark is what `satfuse finetune` and `satfuse finetune sweep` score a pretrained model
on: labelled shards, the classes their label maps turn into, the tasks (single-/multi-label)
and the headline metric of each. Every run reads these members and nothing else, so
BigEarthNet-19 or SEN12MS scene classification is one module with one registered `Benchmark`
subclass (`satfuse.registry.BENCHMARKS`, chosen by `data.benchmark` / `--benchmark`); DFC2020,
the paper's, is `satfuse.evaluation.dfc2020`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from satfuse.registry import BENCHMARKS
from satfuse.utils import SatfuseError

DEFAULT_BENCHMARK = "dfc2020"  # what `data.benchmark` means when unset (and in results written before it existed)
TASKS = ("single", "multi")  # the classification tasks the fine-tuning loop implements


class Benchmark:
    """What a downstream benchmark provides. Subclass it and register the class::

        @BENCHMARKS.register("my_bench")
        class MyBench(Benchmark):
            name = "my_bench"
            ...

    Members are class-level: a benchmark is a definition, not state.
    """

    name: ClassVar[str]
    """The registered name (`data.benchmark`), recorded in every result.json."""

    title: ClassVar[str]
    """How reports and logs name it ("DFC2020")."""

    dataset: ClassVar[str]
    """The `satfuse shard --dataset` whose labelled shards it reads (data.train_shards and
    data.test_shards point at two shard sets of it)."""

    splits: ClassVar[dict[str, str]]
    """Which published split each shard set holds: {"train": ..., "test": ...}. The run holds
    `data.val_fraction` of the train split out (stratified) for early stopping; the test split
    is scored once, at the end."""

    label_members: ClassVar[tuple[str, ...]]
    """The shard members a sample's label map is read from, in order of preference (the first
    one a sample has is used); a sample with none of them is refused naming these."""

    class_names: ClassVar[tuple[str, ...]]
    """The classes, in index order: targets, logits and per-class scores use these indices."""

    tasks: ClassVar[tuple[str, ...]] = TASKS
    """The tasks (`train.task`) it defines: "single" (a crop's most frequent class,
    cross-entropy) and/or "multi" (every class covering `data.multi_label_min_fraction` of the
    crop, sigmoid + BCE)."""

    metrics: ClassVar[dict[str, str]]
    """The headline metric of each task, a key of `satfuse.evaluation.metrics`' results ("aa",
    "f1_macro"): early stopping on `metric`, the log line and the report use it."""

    label_source: ClassVar[str] = "map"
    """Where a sample's target comes from: "map" (a per-pixel label member, `label_map`; a
    crop's targets follow its pixels) or "vector" (a per-sample class-fraction vector in the
    sample's JSON, `label_vector`; scene labels, the same for every crop of the patch)."""

    datasets: ClassVar[tuple[str, ...]] = ()
    """The `satfuse shard --dataset` values whose shard sets it reads; a set of another dataset
    is refused naming `shard_command`. Empty: not checked (a sample without its label member is
    still refused)."""

    shard_splits: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Per role ("train", "val", "test") the `--split` values a shard set's manifest may record;
    a set recording another split is refused. Empty, or a role missing: not checked."""

    shard_command: ClassVar[str] = ""
    """The `satfuse shard` command that writes shards with this benchmark's labels, named by
    every refusal of a shard set that lacks them (empty: "shard a labelled `dataset`")."""

    report_columns: ClassVar[dict[str, tuple[tuple[str, str], ...]]] = {
        "single": (("oa", "OA"), ("aa", "AA"), ("f1_macro", "F1 (macro)")),
        "multi": (("f1_macro", "F1 (macro)"), ("f1_micro", "F1 (micro)"), ("precision_macro", "P (macro)"),
                  ("precision_micro", "P (micro)"), ("recall_macro", "R (macro)"), ("recall_micro", "R (micro)"),
                  ("map", "mAP")),
    }
    """Per task, the (metric key, column header) pairs of `satfuse report`'s tables: the metrics
    the benchmark's literature reports (default: the DFC2020 paper's)."""

    run: ClassVar[Callable[..., dict] | None] = None
    """A loop of the benchmark's own, called as `run(cfg, overwrite, weights)` with
    `finetune.run_finetune`'s arguments instead of the classification loop (segmentation:
    `satfuse.evaluation.segmentation.run_segmentation`, as a staticmethod); None: classification."""

    @classmethod
    def n_classes(cls) -> int:
        """The number of classes (the classifier's outputs)."""
        return len(cls.class_names)

    @classmethod
    def label_map(cls, member: str, array: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class-index map from the label member `member` of one sample (its array
        as stored, e.g. (1, H, W)); pixels of no class are `targets.IGNORE` (255)."""
        raise NotImplementedError

    @classmethod
    def label_vector(cls, meta: dict[str, Any]) -> np.ndarray | None:
        """(n_classes,) float32 class fractions of one sample from its JSON `meta` (label_source
        "vector"; multi-hot labels are fractions of 0 and 1), or None when the sample has none.
        Single-label = argmax, multi-label = fraction >= `data.multi_label_min_fraction`."""
        raise NotImplementedError

    @classmethod
    def extra_metrics(cls, task: str, y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
        """Metrics the benchmark reports beyond `satfuse.evaluation.metrics`' (e.g. micro mAP
        for BigEarthNet), from the test targets and scores of `task`; merged into result.json's
        `metrics`. Default: none (DFC2020's output stays as it was)."""
        return {}

    @classmethod
    def labels_hint(cls) -> str:
        """How to get shards with this benchmark's labels, for refusals."""
        return cls.shard_command or f"shard a labelled dataset ({cls.dataset}) for it"

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What result.json records about the benchmark (its name, classes, task metrics)."""
        return {"name": cls.name, "title": cls.title, "classes": list(cls.class_names), "metrics": dict(cls.metrics)}


def benchmark_class(name: str) -> type[Benchmark]:
    """The registered benchmark `name`; an unknown one is refused listing every choice."""
    return BENCHMARKS.get(name)


def check_task(bench: type[Benchmark], task: str) -> None:
    """Refuse a `train.task` the benchmark does not define, naming the ones it does."""
    if task not in bench.tasks:
        raise SatfuseError(f"train.task={task!r}: benchmark {bench.name!r} defines {', '.join(bench.tasks)}; "
                           "set train.task to one of them (or pick another data.benchmark)")
