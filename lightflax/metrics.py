"""Host-side classification metrics from per-example log-probabilities (pure NumPy).

Besides the per-epoch figures (:func:`classification_metrics`), proxies for a
shifted test set that need no test data (:func:`shift_proxies`):

* balanced accuracy - the mean per-class recall, blind to the class balance;
* accuracy re-weighted to a target class prior - the accuracy expected on a set
  with that class balance under label shift (same images per class, other
  proportions): ``sum_c prior_c * recall_c``; e.g. the PneumoniaMNIST/Kermany test
  split's published 234 normal / 390 pneumonia (:data:`PNEUMONIA_TEST_PRIOR`);
* expected calibration error (ECE), optionally importance-weighted to the target
  prior;
* prior correction of the decision: a model trained at class prior ``p`` and used
  at prior ``q`` should add ``log(q_c / p_c)`` to its log-probabilities and
  renormalise (Bayes' rule; Saerens et al. 2002); for two classes this is a logit
  shift by ``log(q1/q0) - log(p1/p0)``, i.e. the 0.5 threshold on the uncorrected
  probability moves to :func:`prior_threshold`.

Class 1 is the positive class (PNEUMONIA in the X-ray data) throughout.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

# Published class counts of the official test split (Kermany et al. 2018, as in
# PneumoniaMNIST): 234 normal, 390 pneumonia -> 37.5 % normal.
PNEUMONIA_TEST_COUNTS = (234, 390)
PNEUMONIA_TEST_PRIOR = (234 / 624, 390 / 624)

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    ``scores`` are the positive-class scores, ``labels`` 0/1. None when only one
    class is present or a score is NaN (undefined, not a number to report).
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0 or np.isnan(scores).any():
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


def _prior(prior: Sequence[float], name: str) -> np.ndarray:
    p = np.asarray(prior, np.float64).reshape(-1)
    if p.ndim != 1 or len(p) < 2 or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"{name} must be >= 2 non-negative finite class weights, got {prior!r}")
    return p / p.sum()


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The class frequencies of ``labels`` (float64 (num_classes,), summing to 1)."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) == 0:
        raise ValueError("cannot compute a class prior from no labels")
    return np.bincount(labels, minlength=num_classes).astype(np.float64) / len(labels)


def per_class_recall(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class (float64 (num_classes,)); NaN for a class absent from ``labels``."""
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    hits = np.bincount(labels[predictions == labels], minlength=num_classes).astype(np.float64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def majority_class_accuracy(train_labels: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """Accuracy of always predicting the training split's most frequent class (the
    baseline any model must beat; ties go to the lower class index). None for no labels."""
    train_labels = np.asarray(train_labels).astype(np.int64).reshape(-1)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(train_labels) == 0 or len(labels) == 0:
        return None
    majority = int(np.argmax(np.bincount(train_labels)))
    return float(np.mean(labels == majority))


def balanced_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: Optional[int] = None
                      ) -> Optional[float]:
    """Mean recall over the classes present in ``labels`` (None for no labels).

    For two classes: (sensitivity + specificity) / 2.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) == 0:
        return None
    k = num_classes or int(max(labels.max(), np.max(predictions)) + 1)
    recall = per_class_recall(predictions, labels, k)
    return float(np.nanmean(recall))


def reweighted_accuracy(predictions: np.ndarray, labels: np.ndarray, target_prior: Sequence[float]
                        ) -> Optional[float]:
    """Accuracy on a set with class balance ``target_prior`` (label shift): sum_c q_c * recall_c.

    None when a class with q_c > 0 is absent from ``labels`` (its recall is unknown).
    """
    q = _prior(target_prior, "target_prior")
    recall = per_class_recall(predictions, labels, len(q))
    if np.any(np.isnan(recall[q > 0])):
        return None
    return float(np.sum(q[q > 0] * recall[q > 0]))


def label_shift_weights(labels: np.ndarray, target_prior: Sequence[float]) -> np.ndarray:
    """Per-example importance weights q(y) / p_hat(y) (mean 1) that re-weight ``labels``'
    class balance to ``target_prior``. Raises ValueError when a class with q > 0 is absent."""
    q = _prior(target_prior, "target_prior")
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    p = class_prior(labels, len(q))
    if np.any((q > 0) & (p == 0)):
        raise ValueError("cannot re-weight to target_prior: a class it needs is absent from labels")
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(p > 0, q / np.where(p > 0, p, 1.0), 0.0)
    return w[labels]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15,
                               weights: Optional[np.ndarray] = None) -> float:
    """Expected calibration error of the top-class confidence.

    Equal-width bins over (0, 1] (bin b holds confidences in (b/B, (b+1)/B]);
    ECE = sum_b W_b / W * |accuracy_b - confidence_b|, with example weights
    ``weights`` (default 1; e.g. :func:`label_shift_weights`).
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) == 0:
        raise ValueError("cannot compute calibration error on no examples")
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    conf = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    edges = np.arange(num_bins + 1) / num_bins
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
    total = w.sum()
    ece = 0.0
    for b in range(num_bins):
        m = bins == b
        wb = w[m].sum()
        if wb > 0:
            ece += wb / total * abs(np.sum(w[m] * correct[m]) / wb - np.sum(w[m] * conf[m]) / wb)
    return float(ece)


def prior_corrected_log_probs(log_probs: np.ndarray, source_prior: Sequence[float],
                              target_prior: Sequence[float]) -> np.ndarray:
    """log p_target(y|x): ``log_probs`` + log(q_y / p_y), renormalised (Bayes' rule under label shift).

    ``source_prior`` p: the class balance the model was trained at; ``target_prior`` q:
    the one it is used at. Classes with q_y = 0 get -inf.
    """
    lp = np.asarray(log_probs, np.float64)
    p = _prior(source_prior, "source_prior")
    q = _prior(target_prior, "target_prior")
    if len(p) != lp.shape[-1] or len(q) != lp.shape[-1]:
        raise ValueError(f"priors of length {len(p)}/{len(q)} for {lp.shape[-1]} classes")
    if np.any(p == 0):
        raise ValueError("source_prior has a zero class: the model never saw it, cannot correct")
    with np.errstate(divide="ignore"):
        shifted = lp + np.log(q) - np.log(p)
    top = shifted.max(axis=-1, keepdims=True)
    return shifted - (top + np.log(np.sum(np.exp(shifted - top), axis=-1, keepdims=True)))


def prior_logit_shift(source_prior: Sequence[float], target_prior: Sequence[float]) -> float:
    """Two classes: the shift added to the logit log(p1/p0): log(q1/q0) - log(p1/p0)."""
    p = _prior(source_prior, "source_prior")
    q = _prior(target_prior, "target_prior")
    if len(p) != 2 or len(q) != 2:
        raise ValueError("prior_logit_shift is for two classes")
    return float(np.log(q[1] / q[0]) - np.log(p[1] / p[0]))


def prior_threshold(source_prior: Sequence[float], target_prior: Sequence[float]) -> float:
    """Two classes: the threshold on the uncorrected p(class 1) equivalent to 0.5 after
    prior correction (predict 1 when p > threshold): sigmoid(-shift)."""
    return float(1.0 / (1.0 + np.exp(prior_logit_shift(source_prior, target_prior))))


def shift_proxies(log_probs: np.ndarray, labels: np.ndarray, *, source_prior: Sequence[float],
                  target_prior: Sequence[float] = PNEUMONIA_TEST_PRIOR, num_bins: int = 15
                  ) -> Dict[str, Optional[float]]:
    """Figures for a class-balance shift, from a validation split (no test data needed).

    ``source_prior``: the training split's class balance; ``target_prior``: the
    expected test balance (default PneumoniaMNIST's published 37.5 % normal). Keys:
    ``balanced_accuracy``, ``ece`` (as the split is), ``target_prior_accuracy`` and
    ``target_prior_ece`` (re-weighted to ``target_prior``); ``prior_corrected_`` +
    ``balanced_accuracy``, ``target_prior_accuracy``, ``target_prior_ece`` (decision
    and probabilities from :func:`prior_corrected_log_probs`);
    and ``prior_threshold`` (two classes: the corrected decision as a threshold on
    the uncorrected p(class 1)). A figure that needs an absent class is None.
    """
    lp = np.asarray(log_probs, np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    k = lp.shape[-1]
    try:
        w = label_shift_weights(labels, target_prior)
    except ValueError:
        w = None
    out: Dict[str, Optional[float]] = {}
    for prefix, logp in (("", lp), ("prior_corrected_", prior_corrected_log_probs(lp, source_prior,
                                                                               target_prior))):
        pred = logp.argmax(axis=-1)
        probs = np.exp(logp)
        out[prefix + "balanced_accuracy"] = balanced_accuracy(pred, labels, k)
        if not prefix:  # corrected probabilities are meant for the target balance only
            out["ece"] = expected_calibration_error(probs, labels, num_bins)
        out[prefix + "target_prior_accuracy"] = reweighted_accuracy(pred, labels, target_prior)
        out[prefix + "target_prior_ece"] = (None if w is None else
                                            expected_calibration_error(probs, labels, num_bins, weights=w))
    out["prior_threshold"] = prior_threshold(source_prior, target_prior) if k == 2 else None
    return out


def ensemble_log_probs(log_probs: np.ndarray) -> np.ndarray:
    """(R, N, C) per-replica log-probabilities -> (N, C) log of the replicas' AVERAGED probabilities,
    log(mean_r exp(log_probs[r])), computed stably (log-sum-exp)."""
    lp = np.asarray(log_probs, np.float64)
    if lp.ndim != 3 or lp.shape[0] == 0:
        raise ValueError(f"ensemble_log_probs needs (replicas, N, classes), got shape {lp.shape}")
    top = lp.max(axis=0)
    with np.errstate(invalid="ignore"):  # -inf everywhere stays -inf
        out = top + np.log(np.mean(np.exp(lp - top), axis=0))
    return np.where(np.isneginf(top), -np.inf, out)


def threshold_metrics(log_probs: np.ndarray, labels: np.ndarray, threshold: float) -> Dict[str, Optional[float]]:
    """Two classes: accuracy, sensitivity and specificity of the decision p(class 1) > ``threshold``
    (0.5 is the argmax decision up to ties; :func:`prior_threshold` the prior-corrected one)."""
    lp = np.asarray(log_probs, np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if lp.shape[-1] != 2:
        raise ValueError("threshold_metrics is for two classes")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    pred = (np.exp(lp[:, 1]) > threshold).astype(np.int64)
    pos, neg = labels == 1, labels == 0
    return {"accuracy": float(np.mean(pred == labels)),
            "sensitivity": float(np.mean(pred[pos] == 1)) if pos.any() else None,
            "specificity": float(np.mean(pred[neg] == 0)) if neg.any() else None}
