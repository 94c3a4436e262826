"""Evaluation metrics for label distributions: accuracy, macro-F1, expected calibration error,
per-class recall, confusion matrices and reliability bins. Plain numpy, no side effects."""

from __future__ import annotations

import numpy as np


def _check(proba: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if proba.ndim != 2 or y.ndim != 1 or len(proba) != len(y):
        raise ValueError(f"expected proba (n, K) and labels (n,), got {proba.shape} and {y.shape}")
    if len(y) == 0:
        raise ValueError("no items to evaluate")
    if y.min() < 0 or y.max() >= proba.shape[1]:
        raise ValueError("labels out of range")
    return proba, y


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    """Mean F1 over the classes present in y_true or y_pred."""
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(float)
    prec_den = cm.sum(axis=0)
    rec_den = cm.sum(axis=1)
    present = (prec_den + rec_den) > 0
    f1 = np.where(prec_den + rec_den > 0, 2 * tp / np.maximum(prec_den + rec_den, 1), 0.0)
    return float(f1[present].mean()) if present.any() else 0.0


def reliability_bins(proba: np.ndarray, y: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Confidence (max prob) bins: mean confidence, accuracy and count per bin."""
    proba, y = _check(proba, y)
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / np.maximum(count, 1)
    acc = np.bincount(b, weights=correct.astype(float), minlength=n_bins) / np.maximum(count, 1)
    return {"edges": edges, "confidence": mean_conf, "accuracy": acc, "count": count}


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """ECE: count-weighted mean |accuracy − confidence| over equal-width confidence bins."""
    r = reliability_bins(proba, y, n_bins)
    return float((r["count"] * np.abs(r["accuracy"] - r["confidence"])).sum() / r["count"].sum())


def evaluate(proba: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro-F1, ECE and per-class recall of distributions ``proba`` against labels ``y``."""
    proba, y = _check(proba, y)
    k = proba.shape[1]
    pred = proba.argmax(axis=1)
    cm = confusion_matrix(y, pred, k)
    support = cm.sum(axis=1)
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "macro_f1": macro_f1(y, pred, k),
        "ece": expected_calibration_error(proba, y),
        "per_class_recall": {
            c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(class_names)
        },
        "support": {c: int(support[i]) for i, c in enumerate(class_names)},
    }
