"""Harder validation proxies of a change of acquisition, with their own uncertainty (no test data).

    python benchmarks/proxy_eval.py RUN_DIR [RUN_DIR ...] [--out=proxies.json] [--boot=1000]

Scores each finished X-ray run on PneumoniaMNIST's validation split (524 images) under four proxies,
with predict's stored decision, without and with AdaBN (``--adapt_bn``, on all the images of one
condition, as one predict call; :func:`lightflax.predict.adapted_probabilities`), each without and
with the run's validation temperature (``--calibrate=temperature``; in-sample on ``clean``): the
procedures ``stored``, ``T``, ``adabn``, ``adabn+T``:

* ``clean``: the split as it is;
* ``acq6``: the mean over benchmarks/shift_eval.py's six acquisition changes (gamma 0.67 / 1.5,
  contrast 0.6, blur, noise, 20 px round trip) — the family ``--augment=acquisition`` trains on, so
  an augmented model is partly scored on its own training distribution here;
* ``unseen``: the mean over four changes OUTSIDE that family, for recipes chosen on ``acq6``:
  histogram equalisation (a common X-ray post-processing), an unsharp mask (edge enhancement),
  an illumination ramp across the image (x0.7 to x1.3, heel effect) and a severe compound change
  (gamma 0.5, contrast x0.45, 12 px round trip, noise sigma 12 grey levels);
* ``far``: the clean validation images least like the training pool: the quarter (131) whose mean
  distance to their 5 nearest training images (raw pixels averaged to 14x14) is largest.
  PneumoniaMNIST carries no site or date, so atypicality is what can be measured.

Figures (two classes): ``tb_acc`` = the accuracy expected at the official test split's class balance
(234 normal / 390 pneumonia) = 0.375 * specificity + 0.625 * sensitivity of the decision; ROC AUC;
accuracy; balanced accuracy. Per replica (mean +- sample std over replicas = the seed spread) and for
the ensemble (mean of the replicas' probabilities, what predict scores) with a 95 % bootstrap interval
over images (``--boot`` resamples; the same resample for every condition of a proxy), and, for every
run after the first, the paired bootstrap interval of its ensemble's difference from the first run's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shift_eval import SHIFTED, corrupt  # noqa: E402
from lightflax import adapt, data as data_lib, decision as decision_lib, metrics, predict  # noqa: E402
from lightflax.tables import markdown_table  # noqa: E402

UNSEEN = ("equalize", "unsharp", "ramp", "severe")
PROXIES = {"clean": ("all", ("clean",)), "acq6": ("all", SHIFTED), "unseen": ("all", UNSEEN), "far": ("far", ("clean",))}
PROCEDURES = {"stored": (False, False), "T": (False, True), "adabn": (True, False), "adabn+T": (True, True)}
TEST_NORMAL = 234 / 624
KEYS = ("tb_acc", "roc_auc", "accuracy", "balanced_accuracy")


def unseen(images: np.ndarray, condition: str) -> np.ndarray:
    """uint8 (N, H, W, C) -> the images under an ``UNSEEN`` change (uint8, deterministic)."""
    x = images.astype(np.float64)
    if condition == "equalize":
        flat = x.reshape(len(x), -1)
        ranks = np.argsort(np.argsort(flat, axis=1, kind="stable"), axis=1)
        x = (255.0 * ranks / max(1, flat.shape[1] - 1)).reshape(x.shape)
    elif condition == "unsharp":
        x = x + 1.0 * (x - corrupt(images, "blur").astype(np.float64))
    elif condition == "ramp":
        x = x * np.linspace(0.7, 1.3, x.shape[2])[None, None, :, None]
    elif condition == "severe":
        x = 255.0 * (x / 255.0) ** 0.5
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = mean + 0.45 * (x - mean)
        n, h, w, c = x.shape
        import jax

        small = jax.image.resize(x, (n, 12, 12, c), "bilinear", antialias=True)
        x = np.asarray(jax.image.resize(small, (n, h, w, c), "bilinear"))
        x = x + np.random.default_rng(1).normal(0.0, 12.0, x.shape)
    else:
        return corrupt(images, condition)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def far_subset(train: np.ndarray, val: np.ndarray, frac: float = 0.25, k: int = 5) -> np.ndarray:
    """Sorted indices of the ``frac`` of ``val`` images farthest (mean distance to their ``k`` nearest
    training images, raw pixels averaged over 2x2 blocks) from the training pool."""
    def small(a):
        a = a.astype(np.float64).mean(axis=-1) / 255.0
        n, h, w = a.shape
        return a[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4)).reshape(n, -1)

    t, v = small(train), small(val)
    d2 = (v ** 2).sum(1)[:, None] + (t ** 2).sum(1)[None, :] - 2 * v @ t.T
    dist = np.sqrt(np.sort(np.maximum(d2, 0), axis=1)[:, :k]).mean(axis=1)
    return np.sort(np.argsort(-dist, kind="stable")[:int(round(frac * len(val)))])


def figures(y_pred: np.ndarray, p1: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    spec, sens = np.mean(y_pred[labels == 0] == 0), np.mean(y_pred[labels == 1] == 1)
    return {"tb_acc": float(TEST_NORMAL * spec + (1 - TEST_NORMAL) * sens),
            "roc_auc": metrics.roc_auc(p1.astype(np.float64), labels), "accuracy": float(np.mean(y_pred == labels)),
            "balanced_accuracy": float((spec + sens) / 2)}


def score_run(workdir: str, images: Dict[str, np.ndarray]) -> Dict[str, Dict[str, List[np.ndarray]]]:
    """{procedure: {(subset, condition): [(p1, decisions) of replica 0, ..., of the ensemble]}} over
    ``images`` ({(subset, condition): uint8 images}); the ensemble is the mean of the replicas'
    probabilities."""
    module, variables, results, _ = predict.load_replicas(workdir)
    temperature = decision_lib.read(results)["temperature"]
    out = {proc: {} for proc in PROCEDURES}
    for cond, x in images.items():
        for adabn in (False, True):
            per = []
            for v in variables:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    p, dec, _ = predict.adapted_probabilities(module, [v], results, x, 64,
                                                              {"adapt_bn": adabn, "label_shift": "none",
                                                               "calibrate": "none"})
                per.append(np.asarray(p, np.float64))
            for proc, (bn, cal) in PROCEDURES.items():
                if bn != adabn:
                    continue
                ps = [adapt.temperature_scale(p, temperature) if cal else p for p in per]
                ps.append(np.mean(ps, axis=0))
                out[proc][cond] = [(p[:, 1], decision_lib.apply(p, dec)) for p in ps]
    return out


def _scored(run: str, images, cache_dir):
    if cache_dir is None:
        return score_run(run, images)
    import hashlib
    import pickle

    key = hashlib.sha256(open(os.path.join(run, "results.json"), "rb").read()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(run))}-{key}.pkl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    out = score_run(run, images)
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(out, f)
    return out


def proxy_figures(scored, labels_of, idx=None, ensemble_only: bool = False) -> Dict[str, Dict[str, List[float]]]:
    """{proxy: {key: [replica figures..., ensemble figure]}} (mean over the proxy's conditions);
    ``idx``: {subset: image indices into the subset} (a bootstrap resample), None = all;
    ``ensemble_only``: [ensemble figure] alone."""
    out = {}
    for proxy, (subset, conds) in PROXIES.items():
        y = labels_of[subset] if idx is None else labels_of[subset][idx[subset]]
        rows = []
        n = len(scored[(subset, conds[0])])
        for m in ([n - 1] if ensemble_only else range(n)):
            f = []
            for c in conds:
                p1, yp = scored[(subset, c)][m]
                if idx is not None:
                    p1, yp = p1[idx[subset]], yp[idx[subset]]
                f.append(figures(yp, p1, y))
            rows.append({k: float(np.mean([x[k] for x in f])) for k in KEYS})
        out[proxy] = {k: [r[k] for r in rows] for k in KEYS}
    return out


def bootstrap(scored, labels_of, n_boot: int, seed: int = 0):
    """[proxy_figures of each resample] (images resampled with replacement, per subset)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        idx = {s: rng.integers(0, len(y), len(y)) for s, y in labels_of.items()}
        out.append(proxy_figures(scored, labels_of, idx, ensemble_only=True))
    return out


def _ci(values) -> List[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def summarise(all_scored, labels_of, n_boot: int):
    """{run: {procedure: {proxy: {key: {replicas, mean, std, ensemble, ensemble_ci, diff_ci}}}}}."""
    first = next(iter(all_scored))
    boots = {r: {proc: bootstrap(sc, labels_of, n_boot) for proc, sc in per.items()} for r, per in all_scored.items()}
    out = {}
    for run, per in all_scored.items():
        out[run] = {}
        for proc, sc in per.items():
            fig, b, b0 = proxy_figures(sc, labels_of), boots[run][proc], boots[first][proc]
            out[run][proc] = {proxy: {k: {"replicas": v[:-1], "mean": float(np.mean(v[:-1])),
                                          "std": float(np.std(v[:-1], ddof=1)) if len(v) > 2 else 0.0,
                                          "ensemble": v[-1], "ensemble_ci": _ci([x[proxy][k][-1] for x in b]),
                                          "diff_vs_first_ci": _ci([x[proxy][k][-1] - y[proxy][k][-1]
                                                                   for x, y in zip(b, b0)])}
                                      for k, v in f.items()} for proxy, f in fig.items()}
    return out


def tables(summary, first: str) -> str:
    cols = [(p, k) for p in PROXIES for k in ("tb_acc", "roc_auc")]
    rows, diffs = [], []
    for run, per in summary.items():
        for proc, res in per.items():
            rows.append([run, proc, "replicas"] + [f"{res[p][k]['mean']:.3f} ± {res[p][k]['std']:.3f}" for p, k in cols])
            rows.append([run, proc, "ensemble"] + [f"{res[p][k]['ensemble']:.3f} [{res[p][k]['ensemble_ci'][0]:.3f}, "
                                                   f"{res[p][k]['ensemble_ci'][1]:.3f}]" for p, k in cols])
            if run != first:
                diffs.append([run, proc] + ["{:+.3f} [{:+.3f}, {:+.3f}]".format(
                    res[p][k]["ensemble"] - summary[first][proc][p][k]["ensemble"], *res[p][k]["diff_vs_first_ci"])
                    for p, k in cols])
    header = [f"{p} {'tb-acc' if k == 'tb_acc' else 'AUC'}" for p, k in cols]
    text = markdown_table(["run", "predict", "model"] + header, rows)
    if diffs:
        text += f"\n\nEnsemble minus {first}'s (paired bootstrap 95 % interval over images):\n\n"
        text += markdown_table(["run", "predict"] + header, diffs)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="finished X-ray run folders; the first is the reference")
    parser.add_argument("--out", default=None, help="write every figure here (JSON)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--cache", default=None, help="keep each run's scores here (pickle; reused while the "
                        "run's results.json is unchanged)")
    args = parser.parse_args(argv)
    data = data_lib.load("pneumonia_mnist")
    val, train = data.splits["val"], data.splits["train"]
    x, y = np.asarray(val.images), np.asarray(val.labels)
    far = far_subset(np.asarray(train.images), x)
    labels_of = {"all": y, "far": y[far]}
    images = {(s, c): unseen(x if s == "all" else x[far], c) for s, conds in PROXIES.values() for c in conds}
    all_scored = {os.path.basename(os.path.normpath(r)): _scored(r, images, args.cache) for r in args.runs}
    summary = summarise(all_scored, labels_of, args.boot)
    first = next(iter(summary))
    print(f"far subset: {len(far)} images, {int(np.sum(y[far] == 0))} normal ({np.mean(y[far] == 0):.3f}; "
          f"whole split {np.mean(y == 0):.3f})")
    print(tables(summary, first))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"far_indices": far.tolist(), "far_normal_fraction": float(np.mean(y[far] == 0)),
                       "boot": args.boot, "runs": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
