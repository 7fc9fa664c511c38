"""Run reports: results.json, history.csv and curves.png of one run (comparisons across runs: lightflax.tables).

results.json carries the study's columns under fixed keys (read by external
checks): total_params, trainable_params, size_bytes, test_accuracy,
total_time_s (the epoch loop's wall time, compile excluded, summed over --resume
segments), time_per_epoch_s (total_time_s / epochs; the median epoch is
time_per_epoch_median_s); plus test_loss, compile_time_s, images_per_s,
flops_per_step and, for binary tasks, sensitivity, specificity and roc_auc.
With --num_seeds > 1 each metric is the mean over replicas, ``<key>_std`` the
sample standard deviation (ddof=1), and ``replicas`` holds every replica's own numbers;
a single-seed run has no ``*_std`` keys (there is no spread to report).
``memory`` holds XLA's memory analysis of the compiled train step
(``xla_peak_memory_in_bytes``: XLA's own estimate, not a measured peak) and the
process's measured peak resident memory (``process_peak_rss_bytes``).
``majority_baseline`` is the accuracy of always predicting the training split's
most frequent class, per evaluated split.

Evaluation outputs (the best state): per-replica metrics (``replicas``, and their mean/std in
``select_metrics``/``test_metrics``) are ``lightflax.metrics.classification_metrics`` plus, for
two-class data, ``lightflax.metrics.shift_proxies`` (source prior = the training split's class
prior, target prior = ``metrics.PNEUMONIA_TEST_PRIOR``): balanced_accuracy, ece,
target_prior_accuracy, target_prior_ece, prior_corrected_balanced_accuracy,
prior_corrected_target_prior_accuracy, prior_corrected_target_prior_ece, prior_threshold.
``decision`` = {"rule": "argmax" | "prior_corrected", "threshold": p(class 1) threshold or null,
"train_prior": [...], "target_prior": [...] or null}; with ``prior_corrected`` the accuracy,
sensitivity and specificity of that rule are reported next to the 0.5 figures as
``<name>_prior_corrected`` (per replica, in the summaries, and ``test_accuracy_prior_corrected``,
``sensitivity_prior_corrected``, ``specificity_prior_corrected`` at the top). With
--num_seeds > 1, ``select_ensemble``/``test_ensemble`` are the same metrics of the replicas'
averaged probabilities (log of the mean of exp(log_probs)). The raw log-probabilities behind all
of these are in the workdir's predictions.npz (``<split>_log_probs`` (R, N, C) float32,
``<split>_labels`` (N,)).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from lightflax import figures, files, metrics, tables

STUDY_COLUMNS = ("total_params", "trainable_params", "size_bytes", "test_accuracy", "total_time_s",
                 "time_per_epoch_s")


def versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "tensorflow_datasets"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # pragma: no cover - optional
            out[mod] = None
    return out


def device_info() -> Dict[str, Any]:
    import jax

    devs = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devs[0].device_kind,
        "num_devices": len(devs),
        "num_local_devices": jax.local_device_count(),
        "process_count": jax.process_count(),
        "cpu_count": os.cpu_count(),
    }


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return repr(value)


def summarize_over_seeds(per_replica: Optional[List[Dict[str, Any]]]) -> Dict[str, Any]:
    """Mean and sample standard deviation (ddof=1, as ``lightflax.tables``) over replicas for
    every numeric metric; one replica gives the values alone (no ``_std``)."""
    out: Dict[str, Any] = {}
    if not per_replica or per_replica[0] is None:
        return out
    for key in per_replica[0]:
        vals = [r[key] for r in per_replica if r.get(key) is not None]
        if len(vals) == len(per_replica):
            out[key], std = tables.mean_std(vals)
            if std is not None:
                out[key + "_std"] = std
    return out


@dataclasses.dataclass
class RunOutcome:
    """What a finished training loop measured (per-replica lists have num_seeds entries)."""

    counts: Dict[str, int]  # param_counts.variables_counts of one replica
    size_bytes: List[int]  # exported model file sizes
    compiled: Any  # timing.CompiledStep of the train step
    eval_compile_s: float
    step_stats: Dict[str, Any]  # timing.summarize of the step times
    epoch_times: List[float]
    total_s: float
    checkpoint_s: float
    history: List[Dict[str, Any]]
    best_epoch: List[int]
    select_metrics: List[Dict[str, Any]]
    test_metrics: Optional[List[Dict[str, Any]]]
    n_devices: int
    steps_per_epoch: int
    decision: Optional[Dict[str, Any]] = None  # lightflax.decision.build
    select_ensemble: Optional[Dict[str, Any]] = None  # metrics of the replicas' averaged probabilities
    test_ensemble: Optional[Dict[str, Any]] = None


def _dataset_section(data) -> Dict[str, Any]:
    return {
        "name": data.name,
        "synthetic": bool(data.synthetic),
        "source": getattr(data, "source", None),
        "num_classes": data.num_classes,
        "class_names": list(getattr(data, "class_names", []) or []),
        "splits": {k: (None if v is None else int(len(v.labels))) for k, v in data.splits.items()},
        "stored_shape": list(data.splits["train"].images.shape[1:]),
    }


def _speed_section(cfg, o: RunOutcome) -> Dict[str, Any]:
    median = o.step_stats.get("median") if o.step_stats else None
    # XLA's cost analysis of a partitioned program is per device; every device runs
    # the same data-parallel program, so the global step costs n_devices times that.
    flops = o.compiled.flops * o.n_devices if o.compiled.flops is not None else None
    accessed = o.compiled.bytes_accessed * o.n_devices if o.compiled.bytes_accessed is not None else None
    return {
        "compile_time_s": o.compiled.compile_s,
        "lower_time_s": o.compiled.lower_s,
        "eval_compile_s": o.eval_compile_s,
        "total_time_incl_compile_s": o.total_s + o.compiled.lower_s + o.compiled.compile_s,
        "step_time_s": o.step_stats,
        "images_per_s": (cfg.batch_size * cfg.num_seeds / median) if median else None,
        "flops_per_step": flops,
        "bytes_accessed_per_step": accessed,
        "achieved_flops_per_s": (flops / median) if (flops and median) else None,
        "memory": _memory(o.compiled.memory),
    }


def _memory(xla: Optional[Dict[str, int]]) -> Dict[str, Any]:
    """XLA's analysis (its 'peak' renamed: it is an estimate of the executable's buffers) and the
    process's real peak resident set size."""
    out = {("xla_peak_memory_in_bytes" if k == "peak_bytes" else f"xla_{k}"): v for k, v in (xla or {}).items()}
    try:
        import resource

        out["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - not on Linux
        out["process_peak_rss_bytes"] = None
    return out


def _majority_baseline(data, splits: Sequence[str]) -> Dict[str, Optional[float]]:
    train = data.splits["train"].labels
    return {s: metrics.majority_class_accuracy(train, data.splits[s].labels) for s in splits
            if data.splits.get(s) is not None}


def _seeds_section(cfg, o: RunOutcome) -> Dict[str, Any]:
    """Multi-seed runs: the spread over replicas and every replica's own numbers."""
    if cfg.num_seeds == 1:
        return {}
    test = summarize_over_seeds(o.test_metrics)
    return {
        "test_accuracy_std": test.get("accuracy_std"),
        "test_loss_std": test.get("loss_std"),
        "replicas": [{"seed": cfg.seed + r, "best_epoch": o.best_epoch[r], "size_bytes": o.size_bytes[r],
                      "test": o.test_metrics[r] if o.test_metrics else None,
                      cfg.select_split: o.select_metrics[r]} for r in range(cfg.num_seeds)],
    }


def _decision_section(cfg, o: RunOutcome, test: Dict[str, Any]) -> Dict[str, Any]:
    """The prior-corrected headline figures (next to the 0.5 ones) and the ensembles of a multi-seed run."""
    out: Dict[str, Any] = {}
    if cfg.decision == "prior_corrected":
        for key, name in (("test_accuracy", "accuracy"), ("sensitivity", "sensitivity"),
                          ("specificity", "specificity")):
            out[f"{key}_prior_corrected"] = test.get(f"{name}_prior_corrected")
    if cfg.num_seeds > 1:
        out["select_ensemble"] = o.select_ensemble
        out["test_ensemble"] = o.test_ensemble
    return out


def build_results(cfg, data, o: RunOutcome, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """results.json of a run (``cfg``: lightflax.config.RunConfig)."""
    notes = list(getattr(data, "notes", []))
    if o.test_metrics is None:
        notes.append(
            f"{data.name} has no test split here: test columns are null; the best checkpoint was selected "
            f"on '{cfg.select_split}' and its figures are reported under select_metrics, never as test figures"
        )
    test = summarize_over_seeds(o.test_metrics)
    results: Dict[str, Any] = {
        "experiment": cfg.experiment,
        "model": cfg.model.name,
        "model_kwargs": cfg.model_kwargs,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": _dataset_section(data),
        "synthetic": bool(data.synthetic),
        "notes": notes,
        "num_seeds": cfg.num_seeds,
        # the study's columns
        "total_params": o.counts["total"],
        "trainable_params": o.counts["trainable"],
        "non_trainable_params": o.counts["non_trainable"],
        "size_bytes": int(np.mean(o.size_bytes)),
        "test_accuracy": test.get("accuracy"),
        "total_time_s": o.total_s,
        # total training time (compile excluded) / epochs, over every --resume segment
        "time_per_epoch_s": o.total_s / len(o.history) if o.history else None,
        "time_per_epoch_median_s": float(np.median(o.epoch_times)) if o.epoch_times else None,
        "epoch_times_s": o.epoch_times,
        "checkpoint_time_s": o.checkpoint_s,
        # and more
        "test_loss": test.get("loss"),
        "sensitivity": test.get("sensitivity"),
        "specificity": test.get("specificity"),
        "roc_auc": test.get("roc_auc"),
        "test_metrics": test or None,
        "select_split": cfg.select_split,
        "select_metrics": summarize_over_seeds(o.select_metrics),
        "majority_baseline": _majority_baseline(data, [cfg.select_split, "test"]),
        "decision": o.decision,
        **_decision_section(cfg, o, test),
        "best_epoch": o.best_epoch if cfg.num_seeds > 1 else o.best_epoch[0],
        "epochs_run": len(o.history),
        **_speed_section(cfg, o),
        "steps_per_epoch": o.steps_per_epoch,
        "batch_size": cfg.batch_size,
        "devices": device_info(),
        "versions": versions(),
        "config": cfg.to_json(),
        **_seeds_section(cfg, o),
        **(extra or {}),
    }
    return _jsonable(results)


def summary_line(results: Dict[str, Any]) -> str:
    """What a user reads at the end of a run: the selection split's accuracy and ROC AUC, the
    test figures (or that there is no test split), time per epoch."""
    def num(v, fmt="{:.4f}"):
        return "n/a" if v is None else fmt.format(v)

    split, sel = results.get("select_split", "val"), results.get("select_metrics") or {}
    test = (f"test_accuracy={num(results.get('test_accuracy'))} test_roc_auc={num(results.get('roc_auc'))}"
            if results.get("test_metrics") else "no test split")
    return (f"{split}_accuracy={num(sel.get('accuracy'))} {split}_roc_auc={num(sel.get('roc_auc'))} {test} "
            f"time_per_epoch_s={num(results.get('time_per_epoch_s'), '{:.2f}')}")


def write_history_csv(path: str, history: List[Dict[str, Any]], select_split: str = "val") -> None:
    """One row per epoch (and replica, with a seed_index column when there are several).

    The selection split's columns are named after it (``val_loss`` or ``test_loss``)."""
    keys = ["epoch", "train_loss", "train_accuracy", "select_loss", "select_accuracy", "learning_rate", "epoch_s"]
    header = [k.replace("select", select_split) for k in keys]
    n = len(history[0]["train_loss"]) if history else 1
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header if n == 1 else ["seed_index"] + header)
        for row in history:
            for r in range(n):
                values = [row[k][r] if isinstance(row[k], list) else row[k] for k in keys]
                w.writerow(values if n == 1 else [r] + values)


def run_title(results: Dict[str, Any]) -> str:
    """'xray_light K=5, 28 px, pneumonia_mnist (val)': what a figure of this run shows."""
    cfg = results.get("config") or {}
    kwargs = results.get("model_kwargs") or {}
    dataset = results.get("dataset") or {}
    parts = [str(results.get("model", "")) + (f" K={kwargs['k']}" if "k" in kwargs else "")]
    size = cfg.get("image_size") or (dataset.get("stored_shape") or [None])[0]
    if size:
        parts.append(f"{size} px")
    if dataset.get("name"):
        parts.append(f"{dataset['name']}{' (SYNTHETIC)' if results.get('synthetic') else ''}")
    return ", ".join(parts)


def plot_curves(path: str, history: List[Dict[str, Any]], title: str = "", select_split: str = "val",
                synthetic: bool = False, best_epoch: Any = None, epoch_label: str = "selected epoch") -> None:
    """Accuracy and loss curves per epoch, as the study plotted: train and the selection split in
    distinct colours (one shade per seed), integer epoch ticks, the epoch whose weights the run
    kept marked (``best_epoch``, one per replica, labelled ``epoch_label``), and a SYNTHETIC banner
    when the data were random images."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = figures.pyplot().subplots(1, 2, figsize=(10, 4.3))
    epochs = [r["epoch"] for r in history]
    best = best_epoch if isinstance(best_epoch, list) else [best_epoch]
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for split, label, colour, style in (("train", "train", "tab:blue", "-"),
                                            ("select", select_split, "tab:orange", "--")):
            vals = np.array([r[f"{split}_{metric}"] for r in history], dtype=float)
            for r in range(vals.shape[1]):
                ax.plot(epochs, vals[:, r], style, color=colour, marker="o", markersize=3,
                        alpha=1.0 if r == 0 else 0.6, label=label + (f" seed {r}" if vals.shape[1] > 1 else ""))
        for i, e in enumerate(b for b in best if b):
            ax.axvline(e, color="tab:green", linestyle=":", label=epoch_label if i == 0 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    figures.save(fig, path, banner="SYNTHETIC DATA - accuracy is meaningless" if synthetic else None,
                 banner_size=20, banner_alpha=0.35, banner_rotation=20)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON (NaN/inf as null), written atomically."""
    files.atomic_write(path, lambda f: json.dump(_jsonable(obj), f, indent=2), mode="w")


def write_run(workdir: str, results: Dict[str, Any], history: List[Dict[str, Any]], *, select_split: str = "val",
              title: str = "") -> None:
    write_json(os.path.join(workdir, "results.json"), results)
    write_history_csv(os.path.join(workdir, "history.csv"), history, select_split)
    if history:
        title = f"{title}: {run_title(results)}" if title else run_title(results)
        # the epoch whose weights were kept: the best one, or the last under --paper_protocol (keep=last)
        last = results.get("kept_checkpoint") == "last"
        plot_curves(os.path.join(workdir, "curves.png"), history, title, select_split,
                    synthetic=bool(results.get("synthetic")),
                    best_epoch=results.get("kept_epoch") if last else results.get("best_epoch"),
                    epoch_label="kept epoch (last)" if last else "selected epoch")
