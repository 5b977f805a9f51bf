"""Downstream metrics, computed with scikit-learn (not hand-rolled).

Absent classes, stated once here because the numbers depend on it:
- Single-label average accuracy (AA) and macro F1 are means over the classes *present in the
  test labels*; a class that never occurs in the test split has no recall to average and is
  left out (its false positives still count against the true classes' recall and OA).
- Multi-label macro F1/precision/recall and mAP are means over the classes with at least one
  positive in the test labels, for the same reason; micro scores pool every class.
- Per-class numbers of absent classes are reported as None (JSON null), never as 0.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from satfuse.evaluation.targets import CLASS_NAMES, N_CLASSES


def _none_if_nan(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in values]


def single_label_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = N_CLASSES,
                         class_names: tuple[str, ...] = CLASS_NAMES) -> dict:
    """OA, AA (mean per-class recall over present classes) and macro F1, plus per-class numbers."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        raise ValueError("no test samples to score")
    present = np.unique(y_true)
    all_labels = np.arange(n_classes)
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=all_labels, average=None, zero_division=0
    )
    absent = support == 0
    rec = np.where(absent, np.nan, rec)
    f1 = np.where(absent, np.nan, f1)
    predicted = np.isin(all_labels, y_pred)
    prec = np.where(~predicted & absent, np.nan, prec)
    return {
        "oa": float(accuracy_score(y_true, y_pred)),
        "aa": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "n": int(y_true.size),
        "classes_scored": [int(c) for c in present],
        "per_class": {
            "names": list(class_names[:n_classes]),
            "support": [int(s) for s in support],
            "precision": _none_if_nan(prec),
            "recall": _none_if_nan(rec),
            "f1": _none_if_nan(f1),
        },
    }


def multi_label_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5,
                        class_names: tuple[str, ...] = CLASS_NAMES) -> dict:
    """Macro/micro F1, precision, recall at `threshold`, and mAP, over (N, C) multi-hot targets
    (`class_names`: the benchmark's, for the per-class table)."""
    y_true = np.asarray(y_true).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.shape[0] == 0:
        raise ValueError("no test samples to score")
    y_pred = (scores >= threshold).astype(np.int64)
    support = y_true.sum(axis=0)
    present = np.flatnonzero(support > 0)
    kw = {"zero_division": 0}
    prec, rec, f1, _ = precision_recall_fscore_support(y_true, y_pred, average=None, **kw)
    ap = np.full(y_true.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in present:
            ap[c] = average_precision_score(y_true[:, c], scores[:, c])
    absent = support == 0
    return {
        "f1_macro": float(f1_score(y_true[:, present], y_pred[:, present], average="macro", **kw)),
        "f1_micro": float(f1_score(y_true, y_pred, average="micro", **kw)),
        "precision_macro": float(precision_score(y_true[:, present], y_pred[:, present], average="macro", **kw)),
        "precision_micro": float(precision_score(y_true, y_pred, average="micro", **kw)),
        "recall_macro": float(recall_score(y_true[:, present], y_pred[:, present], average="macro", **kw)),
        "recall_micro": float(recall_score(y_true, y_pred, average="micro", **kw)),
        "map": float(np.nanmean(ap)) if present.size else float("nan"),
        "threshold": threshold,
        "n": int(y_true.shape[0]),
        "classes_scored": [int(c) for c in present],
        "per_class": {
            "names": list(class_names[: y_true.shape[1]]),
            "support": [int(s) for s in support],
            "precision": _none_if_nan(np.where(absent & (y_pred.sum(0) == 0), np.nan, prec)),
            "recall": _none_if_nan(np.where(absent, np.nan, rec)),
            "f1": _none_if_nan(np.where(absent, np.nan, f1)),
            "ap": _none_if_nan(ap),
        },
    }


def micro_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Micro mAP: the average precision of every (sample, class) decision pooled, as the
    BigEarthNet literature reports it beside the macro mean (`multi_label_metrics`' "map")."""
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    if y_true.size == 0 or not y_true.any():
        return float("nan")
    return float(average_precision_score(y_true, np.asarray(scores, dtype=np.float64).ravel()))
