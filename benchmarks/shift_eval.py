"""Validation figures under shifts that need no test data: class balance AND image acquisition.

    python benchmarks/shift_eval.py RUN_DIR [RUN_DIR ...] [--out=shift.json]

For every finished X-ray run (a folder with results.json and model*.msgpack) this scores the
validation split of the run's dataset (PneumoniaMNIST's official val split) with each replica and
with the ensemble of its replicas (the mean of their probabilities, as ``predict`` does), on the
clean images and on fixed, seeded acquisition changes that the study's augmentation does NOT
contain (so that an augmented model is not scored on its own training distribution):

* ``gamma0.67`` / ``gamma1.5``: exposure curves (255 * (x/255) ** g);
* ``contrast0.6``: contrast reduced around each image's mean;
* ``blur``: a 3x3 Gaussian (sigma 0.8), a softer detector;
* ``noise``: additive Gaussian noise, sigma 8 grey levels (seed 0);
* ``lowres``: down to 20x20 and back (bilinear), a coarser acquisition.

Each condition is reported at the 0.5 threshold (accuracy, balanced accuracy, ROC AUC) and as the
accuracy expected at the official test split's class balance (234 normal / 390 pneumonia), with
the 0.5 decision and with the prior-corrected one (``lightflax.metrics``; corrected from the
training prior, or from a uniform one for runs trained with ``--class_weighting=balanced``). "shifted mean" is the
mean over the six changed conditions (the clean one excluded), per replica then mean +- sample
std over replicas; the ensemble is one model, so it has one value.

The script prints a markdown table (one row per run and model: replicas as mean +- std, then the
ensemble) and writes every figure to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import jax
import numpy as np

from lightflax import data as data_lib, metrics, predict
from lightflax.tables import markdown_table

CONDITIONS = ("clean", "gamma0.67", "gamma1.5", "contrast0.6", "blur", "noise", "lowres")
SHIFTED = CONDITIONS[1:]


def corrupt(images: np.ndarray, condition: str) -> np.ndarray:
    """uint8 (N, H, W, C) -> the same images under ``condition`` (uint8, deterministic)."""
    x = images.astype(np.float64)
    if condition == "clean":
        return images
    if condition.startswith("gamma"):
        x = 255.0 * (x / 255.0) ** float(condition[len("gamma"):])
    elif condition.startswith("contrast"):
        c = float(condition[len("contrast"):])
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = mean + c * (x - mean)
    elif condition == "blur":
        g = np.exp(-0.5 * (np.arange(-1, 2) / 0.8) ** 2)
        g /= g.sum()
        pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        h = sum(g[i] * pad[:, :, i:i + x.shape[2], :] for i in range(3))
        x = sum(g[i] * h[:, i:i + x.shape[1], :, :] for i in range(3))
    elif condition == "noise":
        x = x + np.random.default_rng(0).normal(0.0, 8.0, x.shape)
    elif condition == "lowres":
        n, h, w, c = x.shape
        small = jax.image.resize(x, (n, 20, 20, c), "bilinear", antialias=True)
        x = np.asarray(jax.image.resize(small, (n, h, w, c), "bilinear"))
    else:
        raise ValueError(f"unknown condition {condition!r}")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def figures(p: np.ndarray, labels: np.ndarray, train_prior) -> Dict[str, float]:
    """The reported figures of probabilities ``p`` (N, 2)."""
    lp = np.log(np.clip(p.astype(np.float64), 1e-12, 1.0))
    basic = metrics.classification_metrics(lp, labels)
    proxy = metrics.shift_proxies(lp, labels, source_prior=train_prior)
    return {"accuracy": basic["accuracy"], "roc_auc": basic["roc_auc"],
            "balanced_accuracy": proxy["balanced_accuracy"],
            "target_prior_accuracy": proxy["target_prior_accuracy"],
            "prior_corrected_target_prior_accuracy": proxy["prior_corrected_target_prior_accuracy"]}


def evaluate_run(workdir: str, val_images: np.ndarray, val_labels: np.ndarray, train_prior,
                 inputs_cache: Dict = None) -> Dict[str, List]:
    """{condition: [figures of replica 0, ..., figures of the ensemble]}. The prior correction starts
    from the prior the model reflects: the training split's, or uniform for a class-balanced loss.
    The model inputs of each condition (for a transfer run: the backbone's features, the costly
    part) are computed once and kept in ``inputs_cache`` for other runs of the same backbone."""
    module, variables, results, _ = predict.load_replicas(workdir)
    if results["config"].get("class_weighting") == "balanced":
        train_prior = np.array([0.5, 0.5])
    inputs_cache = {} if inputs_cache is None else inputs_cache
    feeds = (results.get("backbone"), results.get("backbone_weights_sha256"),
             results["config"].get("model"), str((results["config"].get("model_kwargs") or {}).get("first_block")))
    out: Dict[str, List] = {}
    for cond in CONDITIONS:
        key = (feeds, cond) if results.get("backbone") else None
        if key is None or key not in inputs_cache:
            x = predict.model_inputs(results, corrupt(val_images, cond))
            if key is not None:
                inputs_cache[key] = x
        else:
            x = inputs_cache[key]
        per = [predict.probabilities_of_inputs(module, v, results, x) for v in variables]
        rows = [figures(p, val_labels, train_prior) for p in per]
        if len(per) > 1:
            rows.append(figures(np.mean(per, axis=0), val_labels, train_prior))
        out[cond] = rows
    return out


def _cell(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def table(all_runs: Dict[str, Dict[str, List]]) -> str:
    keys = ("accuracy", "roc_auc", "balanced_accuracy", "target_prior_accuracy",
            "prior_corrected_target_prior_accuracy")
    header = ["run", "model"] + [f"clean {k}" for k in keys] + [f"shifted mean {k}" for k in keys]
    rows = []
    for run, res in all_runs.items():
        n = len(res["clean"])
        ensemble = n > 1
        replicas = n - 1 if ensemble else n
        groups = [("replicas" if replicas > 1 else "model", range(replicas))]
        if ensemble:
            groups.append(("ensemble", [n - 1]))
        for label, idx in groups:
            clean = [_cell([res["clean"][i][k] for i in idx]) for k in keys]
            shifted = [_cell([float(np.mean([res[c][i][k] for c in SHIFTED])) for i in idx]) for k in keys]
            rows.append([run, label if label != "replicas" else f"{replicas} replicas"] + clean + shifted)
    return markdown_table(header, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="finished X-ray run folders")
    parser.add_argument("--out", default=None, help="write every figure here (JSON)")
    args = parser.parse_args(argv)
    data = data_lib.load("pneumonia_mnist")
    val = data.splits["val"]
    train_prior = metrics.class_prior(data.splits["train"].labels, 2)
    all_runs, inputs_cache = {}, {}
    for run in args.runs:
        all_runs[os.path.basename(os.path.normpath(run))] = evaluate_run(run, np.asarray(val.images),
                                                                         np.asarray(val.labels), train_prior,
                                                                         inputs_cache)
    print(table(all_runs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(all_runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
