from __future__ import annotations

import numpy as np
import pytest

from molal.metrics import confusion_matrix, evaluate, expected_calibration_error, macro_f1, reliability_bins


def test_confusion_and_f1():
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0])
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # F1: class0 2*1/(2+2)=0.5, class1 2*2/(3+2)=0.8, class2 0
    assert macro_f1(y, p, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_ece_perfect_and_overconfident():
    y = np.array([0, 1, 0, 1])
    onehot = np.eye(2)[y]
    assert expected_calibration_error(onehot, y) == pytest.approx(0.0)
    wrong = np.eye(2)[1 - y]
    assert expected_calibration_error(wrong, y) == pytest.approx(1.0)
    half = np.full((4, 2), 0.5)
    r = reliability_bins(half, y)
    assert r["count"].sum() == 4


def test_evaluate_report():
    y = np.array([0, 1, 1, 2])
    proba = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0.6, 0.4, 0], [0, 0, 1.0]])
    rep = evaluate(proba, y, ["a", "b", "c"])
    assert rep["accuracy"] == 0.75 and rep["per_class_recall"] == {"a": 1.0, "b": 0.5, "c": 1.0}
    with pytest.raises(ValueError):
        evaluate(proba, np.array([0, 1, 5, 0]), ["a", "b", "c"])
