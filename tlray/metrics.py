"""Classification metrics computed from gathered labels and softmax probabilities."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan")


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC (probability of class 1), or macro one-vs-rest AUC for several classes.

    Classes that are absent from `labels` (possible in a small validation split) are left
    out of the macro average instead of making the whole metric undefined.
    """
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
