"""Segmentation scores as the segmentation literature and the DFC2020 contest report them.

All of them come from one pixel confusion matrix (rows: true class, columns: predicted), which
ranks sum exactly (an all-reduce of integers), so a distributed test pass scores the same as
one process. Pixels labelled ignore (255: no data, and DFC2020's Savanna and Snow/Ice, as the
authors drop them) are not counted.

- IoU of class c = TP / (TP + FP + FN); mIoU = mean IoU over the classes *present in the test
  labels* (an absent class has no IoU to average; its false positives still lower the IoU of
  the true classes), the convention `satfuse.evaluation.metrics` uses for AA.
- Overall pixel accuracy (OA) = trace / total; average pixel accuracy (AA) = mean per-class
  recall over the same present classes.
- Per-class numbers of absent classes are None (JSON null), never 0.
"""

from __future__ import annotations

import numpy as np
import torch

from satfuse.evaluation.metrics import _none_if_nan


def confusion(target: torch.Tensor, pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) int64 pixel counts [true, predicted] of integer maps of any shape;
    target pixels >= n_classes (IGNORE) are left out."""
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = t < n_classes
    idx = t[keep] * n_classes + p[keep]
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def seg_metrics(conf: np.ndarray, class_names: tuple[str, ...]) -> dict:
    """mIoU, OA, AA and per-class IoU / accuracy / test pixels of a confusion matrix."""
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.shape[0]
    total = conf.sum()
    if total == 0:
        raise ValueError("no labelled test pixel to score")
    tp = np.diag(conf)
    support = conf.sum(axis=1)
    predicted = conf.sum(axis=0)
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(present, tp / (support + predicted - tp), np.nan)
        acc = np.where(present, tp / support, np.nan)
    return {
        "miou": float(np.nanmean(iou)), "oa": float(tp.sum() / total), "aa": float(np.nanmean(acc)),
        "n_pixels": int(total), "classes_scored": [int(c) for c in np.flatnonzero(present)],
        "per_class": {"names": list(class_names[:n]), "iou": _none_if_nan(iou), "accuracy": _none_if_nan(acc),
                      "support": [int(s) for s in support]},
    }
