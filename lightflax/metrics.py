"""Host-side classification metrics from per-example log-probabilities."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    ``scores`` are the positive-class scores, ``labels`` 0/1. None when only one
    class is present.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_metrics(log_probs: np.ndarray, labels: np.ndarray) -> Dict[str, Optional[float]]:
    """loss, accuracy and, for two classes, sensitivity, specificity and ROC AUC.

    Class 1 is the positive class (PNEUMONIA in the X-ray data).
    """
    log_probs = np.asarray(log_probs, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    pred = np.argmax(log_probs, axis=-1)
    out: Dict[str, Optional[float]] = {
        "loss": float(-np.mean(log_probs[np.arange(len(labels)), labels])),
        "accuracy": float(np.mean(pred == labels)),
    }
    if log_probs.shape[-1] == 2:
        pos, neg = labels == 1, labels == 0
        out["sensitivity"] = float(np.mean(pred[pos] == 1)) if pos.any() else None
        out["specificity"] = float(np.mean(pred[neg] == 0)) if neg.any() else None
        out["roc_auc"] = roc_auc(np.exp(log_probs[:, 1]), labels)
    return out
