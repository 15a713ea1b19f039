"""Classification metrics computed from gathered labels and softmax probabilities, and the one
rule for which of two values of a metric is better."""

from __future__ import annotations

import math

import numpy as np


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan")


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC (probability of class 1), or macro one-vs-rest AUC for several classes.

    Classes that are absent from `labels` (possible in a small validation split) are left
    out of the macro average instead of making the whole metric undefined.
    """
    from sklearn.metrics import roc_auc_score

    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1])) if len(set(labels)) == 2 else float("nan")
    scores = [roc_auc_score(labels == c, probs[:, c]) for c in range(probs.shape[1])
              if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean(scores)) if scores else float("nan")


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(cm) / cm.sum(1)


def is_better(value: float | None, best: float | None, mode: str) -> bool:
    """Whether `value` beats `best` for a metric that improves in `mode` ("min" or "max").

    A missing or NaN value never does; anything finite beats no best at all. Early stopping,
    the best checkpoint, the sweep's pick, the champion and the benchmarks all ask this.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value < best if mode == "min" else value > best


def reaches(value: float | None, goal: float | None, mode: str) -> bool:
    """Whether a metric value is at least as good as a goal ("max": >=, "min": <=)."""
    if goal is None or value is None or not math.isfinite(value):
        return False
    return value >= goal if mode == "max" else value <= goal


def best_of(items, value, mode: str):
    """The first item whose `value(item)` no later one beats (`is_better`); None if none has
    a finite value."""
    best = None
    for item in items:
        if is_better(value(item), None if best is None else value(best), mode):
            best = item
    return best


def format_number(value) -> str:
    """A metric or setting as a person reads it: floats to 4 significant digits (``nan`` when
    not finite), anything else as it is."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "nan"
    return str(value)
