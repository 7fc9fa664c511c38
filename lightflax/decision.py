"""The decision rule of a run: how class probabilities become a predicted class.

    decision = decision.build(cfg, data, val)   # at training: results.json's ``decision`` entry
    decision = decision.read(results, path)     # from a finished run's results.json, checked
    classes = decision.apply(probabilities, decision)
    metrics = decision.split_metrics(log_probs, labels, decision)

The entry: ``{"rule": "argmax" | "prior_corrected", "threshold": float | null, "train_prior": [...],
"model_prior": [...], "target_prior": [...] | null, "temperature": float | null}`` (see :func:`build`;
``temperature`` is the calibration predict's ``--calibrate=temperature`` applies, null or absent: 1).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from lightflax import adapt, metrics as metrics_lib
from lightflax.config import RunConfig
from lightflax.errors import UserError


def build(cfg: RunConfig, data, val: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Dict[str, Any]:
    """results.json's ``decision``: {"rule", "threshold", "train_prior", "model_prior", "target_prior"}.

    ``train_prior``: the training split's class frequencies. ``model_prior``: the class balance the
    model's probabilities reflect: the training prior, or uniform with ``class_weighting="balanced"``
    (a loss that weighs the classes equally trains at a uniform prior; correcting from the training
    prior would shift the decision twice). ``target_prior``: the expected test class balance,
    :data:`lightflax.metrics.PNEUMONIA_TEST_PRIOR` for two-class data (the X-ray datasets, and
    synthetic data standing in for them), None otherwise. ``threshold``: with
    ``rule="prior_corrected"`` the threshold on p(class 1) above which class 1 is predicted
    (:func:`lightflax.metrics.prior_threshold` from the model prior); None with ``argmax``.
    ``temperature``: :func:`lightflax.adapt.fit_temperature` on ``val`` = (log-probabilities (R, N, C)
    of the run's replicas, labels (N,)) of the validation split, the replicas' averaged probabilities
    (what predict scores); None without ``val``. It changes no decision here: predict applies it only
    with --calibrate=temperature."""
    k = data.num_classes
    train_prior = metrics_lib.class_prior(data.splits["train"].labels, k)
    model_prior = np.full(k, 1.0 / k) if cfg.class_weighting == "balanced" else train_prior
    target = list(metrics_lib.PNEUMONIA_TEST_PRIOR) if k == 2 else None
    threshold = None
    if cfg.decision == "prior_corrected":
        if target is None:
            raise UserError(f"--decision=prior_corrected is for two-class data; {data.name} has {k} classes: "
                            f"use --decision=argmax")
        if np.any(train_prior == 0):
            raise UserError("--decision=prior_corrected needs both classes in the training split; "
                            "use --decision=argmax")
        threshold = metrics_lib.prior_threshold(model_prior, target)
    temperature = None
    if val is not None:
        temperature = adapt.fit_temperature(metrics_lib.ensemble_log_probs(val[0]), val[1])
    return {"rule": cfg.decision, "threshold": threshold, "train_prior": train_prior.tolist(),
            "model_prior": model_prior.tolist(), "target_prior": target, "temperature": temperature}


def split_metrics(log_probs: np.ndarray, labels: np.ndarray, decision: Dict[str, Any]) -> Dict[str, Any]:
    """One set of (N, C) log-probabilities: classification_metrics, plus shift_proxies where the
    decision has a target prior, plus ``<accuracy|sensitivity|specificity>_prior_corrected`` with
    the prior-corrected rule (the 0.5 figures stay under their own names)."""
    out = metrics_lib.classification_metrics(log_probs, labels)
    if decision["target_prior"] is not None:
        out.update(metrics_lib.shift_proxies(log_probs, labels, source_prior=decision["model_prior"],
                                             target_prior=decision["target_prior"]))
    if decision["rule"] == "prior_corrected":
        corrected = metrics_lib.threshold_metrics(log_probs, labels, decision["threshold"])
        out.update({f"{k}_prior_corrected": v for k, v in corrected.items()})
    return out


def read(results, path: str = "results.json") -> Dict[str, Any]:
    """The run's decision entry, checked: {"rule", "threshold", "train_prior", "model_prior", "target_prior",
    "temperature"} (``{"rule": "argmax", ...None, "temperature": 1.0}`` for runs without one; runs
    without a temperature read as 1.0)."""
    d = results.get("decision")
    if d is None:
        return {"rule": "argmax", "threshold": None, "train_prior": None, "model_prior": None, "target_prior": None,
                "temperature": 1.0}
    c = int(results["dataset"]["num_classes"])
    try:
        rule, threshold = d["rule"], d.get("threshold")
        if rule not in ("argmax", "prior_corrected"):
            raise ValueError(f"rule {rule!r} is not argmax or prior_corrected")
        if threshold is not None:
            threshold = float(threshold)
            if c != 2 or not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold {threshold} needs a binary task and a value in [0, 1]")
        priors = {}
        for key in ("train_prior", "model_prior", "target_prior"):
            v = d.get(key)
            priors[key] = None if v is None else np.asarray(v, np.float64)
            if v is not None and (priors[key].shape != (c,) or not np.all(priors[key] > 0)):
                raise ValueError(f"{key} must hold {c} positive numbers")
        if rule == "prior_corrected" and threshold is None and priors["train_prior"] is None:
            raise ValueError("prior_corrected without a threshold needs train_prior")
        temperature = 1.0 if d.get("temperature") is None else float(d["temperature"])
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature {temperature} must be a positive number")
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise UserError(f"{path}: its decision entry is damaged ({e}); re-run the training or restore the "
                        f"file") from None
    return {"rule": rule, "threshold": threshold, **priors, "temperature": temperature}


def apply(probabilities: np.ndarray, decision: Dict[str, Any]) -> np.ndarray:
    """Predicted classes (N,) int64 of (N, C) probabilities under :func:`read`'s rule."""
    p = np.asarray(probabilities, np.float64)
    if decision["threshold"] is not None:
        return (p[:, 1] > decision["threshold"]).astype(np.int64)
    if decision["rule"] == "prior_corrected":
        target = decision["target_prior"]
        target = np.full(p.shape[1], 1.0 / p.shape[1]) if target is None else target
        # the prior the model's probabilities carry: uniform for a class-balanced loss (model_prior),
        # the training split's otherwise; runs older than model_prior carry only train_prior
        source = decision.get("model_prior")
        source = decision["train_prior"] if source is None else source
        with np.errstate(divide="ignore"):
            return np.argmax(metrics_lib.prior_corrected_log_probs(np.log(p), source, target), axis=1).astype(np.int64)
    return np.argmax(p, axis=1).astype(np.int64)
