"""predict's test-time adaptation options on validation proxies (no test data).

    python benchmarks/tta_eval.py RUN_DIR [--out=tta.json]

Scores the run (every replica averaged, as ``predict`` does) on PneumoniaMNIST's validation split
under benchmarks/shift_eval.py's conditions (clean and six acquisition changes), on two sets:
``val`` (the split as it is) and ``val@test-balance`` (every normal image and a seeded subsample of
the pneumonia ones, at the official test split's balance 234:390: a real label shift for EM to
find). Each option is predict's own code path (:func:`lightflax.predict.adapted_probabilities`):

* ``stored``: the run's decision rule; ``fixed prior``: corrected to the published test prior;
* ``em``: --label_shift=em; ``T+fixed``/``T+em``: with --calibrate=temperature first;
* ``adabn`` variants: --adapt_bn on the images of the set, then the same rules.

The temperature is fitted on the same validation split, so the calibrated rows are in-sample.
Prints one markdown table (accuracy, balanced accuracy and ROC AUC: clean, and the mean over the six
shifted conditions) and writes every figure to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shift_eval import CONDITIONS, SHIFTED, corrupt  # noqa: E402
from lightflax import adapt, data as data_lib, decision as decision_lib, metrics, predict  # noqa: E402
from lightflax.tables import markdown_table  # noqa: E402

OPTIONS = {"stored": ("run", False, "none", "none"), "fixed prior": ("fixed", False, "none", "none"),
           "em": ("run", False, "em", "none"), "T+fixed": ("fixed", False, "none", "temperature"),
           "T+em": ("run", False, "em", "temperature"), "adabn": ("run", True, "none", "none"),
           "adabn+fixed": ("fixed", True, "none", "none"), "adabn+em": ("run", True, "em", "none"),
           "adabn+T+em": ("run", True, "em", "temperature")}


def _sets(val, seed: int = 0):
    images, labels = np.asarray(val.images), np.asarray(val.labels)
    normal, pneu = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    keep = np.random.default_rng(seed).choice(pneu, size=min(len(pneu), round(len(normal) * 390 / 234)),
                                              replace=False)
    idx = np.sort(np.concatenate([normal, keep]))
    return {"val": (images, labels), "val@test-balance": (images[idx], labels[idx])}


def _fixed(results):
    """The run's decision moved to the published test prior (what --recipe=robust stores)."""
    d = decision_lib.read(results)
    source = d["model_prior"] if d["model_prior"] is not None else d["train_prior"]
    return dict(d, rule="prior_corrected", target_prior=np.asarray(metrics.PNEUMONIA_TEST_PRIOR),
                threshold=metrics.prior_threshold(source, metrics.PNEUMONIA_TEST_PRIOR))


def _score(module, variables, results, images, labels):
    """{option: figures}: the model's probabilities once with and once without AdaBN (predict's own
    code path), then each option's calibration and decision on them, as predict applies them."""
    out = {}
    for adabn in (False, True):
        with contextlib.redirect_stdout(io.StringIO()):
            p, _, _ = predict.adapted_probabilities(module, variables, results, images, 64,
                                                    {"adapt_bn": adabn, "label_shift": "none", "calibrate": "none"})
        for option, (rule, bn, shift, cal) in OPTIONS.items():
            if bn != adabn:
                continue
            q = p if cal == "none" else adapt.temperature_scale(p, decision_lib.read(results)["temperature"])
            dec = _fixed(results) if rule == "fixed" else decision_lib.read(results)
            if shift == "em":
                with contextlib.redirect_stdout(io.StringIO()):
                    dec, _ = predict._label_shift(np.asarray(q, np.float64), dec)
            y = decision_lib.apply(q, dec)
            out[option] = {"accuracy": float(np.mean(y == labels)),
                           "balanced_accuracy": metrics.balanced_accuracy(y, labels, 2),
                           "roc_auc": metrics.roc_auc(np.asarray(q[:, 1], np.float64), labels)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    module, variables, results, _ = predict.load_replicas(args.run)
    sets = _sets(data_lib.load("pneumonia_mnist").splits["val"])
    scores = {s: {c: _score(module, variables, results, corrupt(x, c), y) for c in CONDITIONS}
              for s, (x, y) in sets.items()}
    out = {s: {o: {c: per[c][o] for c in CONDITIONS} for o in OPTIONS} for s, per in scores.items()}
    keys = ("accuracy", "balanced_accuracy", "roc_auc")
    rows = [[s, o] + [f"{res['clean'][k]:.4f}" for k in keys]
            + [f"{np.mean([res[c][k] for c in SHIFTED]):.4f}" for k in keys]
            for s, per in out.items() for o, res in per.items()]
    print(markdown_table(["set", "option"] + [f"clean {k}" for k in keys] + [f"shifted mean {k}" for k in keys],
                         rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
