"""Metric values on examples computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from satfuse.evaluation.metrics import multi_label_metrics, single_label_metrics


def test_single_label_hand_checked():
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0]
    m = single_label_metrics(np.array(y_true), np.array(y_pred))
    assert m["oa"] == pytest.approx(3 / 5)
    # recalls: class0 1/2, class1 2/2, class2 0/1 -> AA 0.5 (classes 3..7 absent: not averaged)
    assert m["aa"] == pytest.approx(0.5)
    # F1: class0 P=1/2 R=1/2 -> .5; class1 P=2/3 R=1 -> .8; class2 -> 0
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["classes_scored"] == [0, 1, 2]
    pc = m["per_class"]
    assert pc["support"] == [2, 2, 1, 0, 0, 0, 0, 0]
    assert pc["recall"][:3] == pytest.approx([0.5, 1.0, 0.0])
    assert pc["recall"][3:] == [None] * 5


def test_single_label_prediction_of_absent_class_costs_recall_not_average():
    m = single_label_metrics(np.array([0, 0]), np.array([0, 3]))
    assert m["oa"] == pytest.approx(0.5)
    assert m["aa"] == pytest.approx(0.5)  # only class 0 is scored
    assert m["per_class"]["precision"][3] == 0.0  # predicted but never right
    assert m["per_class"]["recall"][3] is None


def _multi_example():
    y = np.zeros((4, 8), dtype=np.int64)
    y[:, :3] = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [1, 0, 0]]
    s = np.full((4, 8), 0.1)
    s[:, :3] = [[0.9, 0.6, 0.2], [0.4, 0.8, 0.1], [0.7, 0.3, 0.6], [0.2, 0.1, 0.05]]
    return y, s


def test_multi_label_hand_checked():
    y, s = _multi_example()
    m = multi_label_metrics(y, s, threshold=0.5)
    # class0 TP2 FP0 FN1; class1 TP1 FP1 FN1; class2 TP0 FP1 FN1
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert m["f1_macro"] == pytest.approx((0.8 + 0.5 + 0) / 3)
    assert m["precision_micro"] == pytest.approx(3 / 5)
    assert m["recall_micro"] == pytest.approx(3 / 6)
    assert m["f1_micro"] == pytest.approx(2 * 0.6 * 0.5 / 1.1)
    # AP: class0 (1 + 1 + 3/4)/3, class1 (1 + 2/3)/2, class2 1/2
    assert m["per_class"]["ap"][:3] == pytest.approx([2.75 / 3, 5 / 6, 0.5])
    assert m["map"] == pytest.approx((2.75 / 3 + 5 / 6 + 0.5) / 3)
    assert m["classes_scored"] == [0, 1, 2]
    assert m["per_class"]["ap"][3:] == [None] * 5


def test_multi_label_false_positive_on_absent_class_only_hurts_micro():
    y, s = _multi_example()
    s2 = s.copy()
    s2[0, 6] = 0.9  # a class without test positives, predicted once
    base, m = multi_label_metrics(y, s), multi_label_metrics(y, s2)
    assert m["f1_macro"] == pytest.approx(base["f1_macro"])
    assert m["precision_micro"] == pytest.approx(3 / 6)


def test_empty_inputs_rejected():
    with pytest.raises(ValueError):
        single_label_metrics(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError):
        multi_label_metrics(np.zeros((0, 8)), np.zeros((0, 8)))
