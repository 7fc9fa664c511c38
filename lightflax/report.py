"""Run reports: results.json, history.csv, curves.png, and the study's comparison.

results.json carries the study's columns under fixed keys (read by external
checks): total_params, trainable_params, size_bytes, test_accuracy,
total_time_s (the epoch loop's wall time, compile excluded, summed over --resume
segments), time_per_epoch_s (total_time_s / epochs; the median epoch is
time_per_epoch_median_s); plus test_loss, compile_time_s, images_per_s,
flops_per_step and, for binary tasks, sensitivity, specificity and roc_auc.
With --num_seeds > 1 each metric is the mean over replicas, ``<key>_std`` the
sample standard deviation (ddof=1), and ``replicas`` holds every replica's own numbers.
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

from lightflax import files, tables

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


def summarize_replicas(per_replica: Optional[List[Dict[str, Any]]]) -> Dict[str, Any]:
    """Mean and sample standard deviation (ddof=1, as ``lightflax.tables``; 0 for one
    replica) over replicas for every numeric metric."""
    out: Dict[str, Any] = {}
    if not per_replica or per_replica[0] is None:
        return out
    for key in per_replica[0]:
        vals = [r[key] for r in per_replica if r.get(key) is not None]
        if len(vals) == len(per_replica):
            out[key] = float(np.mean(vals))
            out[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return out


@dataclasses.dataclass
class RunOutcome:
    """What a finished training loop measured (per-replica lists have num_seeds entries)."""

    counts: Dict[str, int]  # summary.variables_counts of one replica
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
        "memory": o.compiled.memory,
    }


def _replica_section(cfg, o: RunOutcome) -> Dict[str, Any]:
    """Multi-seed runs: the spread over replicas and every replica's own numbers."""
    if cfg.num_seeds == 1:
        return {}
    test = summarize_replicas(o.test_metrics)
    return {
        "test_accuracy_std": test.get("accuracy_std"),
        "test_loss_std": test.get("loss_std"),
        "replicas": [{"seed": cfg.seed + r, "best_epoch": o.best_epoch[r], "size_bytes": o.size_bytes[r],
                      "test": o.test_metrics[r] if o.test_metrics else None,
                      cfg.select_split: o.select_metrics[r]} for r in range(cfg.num_seeds)],
    }


def build_results(cfg, data, o: RunOutcome, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """results.json of a run (``cfg``: lightflax.config.RunConfig)."""
    notes = list(getattr(data, "notes", []))
    if o.test_metrics is None:
        notes.append(
            f"{data.name} has no test split here: test columns are null; the best checkpoint was selected "
            f"on '{cfg.select_split}' and its figures are reported under select_metrics, never as test figures"
        )
    test = summarize_replicas(o.test_metrics)
    results: Dict[str, Any] = {
        "experiment": cfg.experiment,
        "model": cfg.model,
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
        "select_metrics": summarize_replicas(o.select_metrics),
        "best_epoch": o.best_epoch if cfg.num_seeds > 1 else o.best_epoch[0],
        "epochs_run": len(o.history),
        **_speed_section(cfg, o),
        "steps_per_epoch": o.steps_per_epoch,
        "batch_size": cfg.batch_size,
        "devices": device_info(),
        "versions": versions(),
        "config": cfg.to_json(),
        **_replica_section(cfg, o),
        **(extra or {}),
    }
    return _jsonable(results)


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


def plot_curves(path: str, history: List[Dict[str, Any]], title: str = "", select_split: str = "val") -> None:
    """Accuracy and loss curves (train and selection split) per epoch, as the study plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for split, label, style in (("train", "train", "-"), ("select", select_split, "--")):
            vals = np.array([r[f"{split}_{metric}"] for r in history], dtype=float)
            for r in range(vals.shape[1]):
                ax.plot(epochs, vals[:, r], style, color=f"C{r}",
                        label=label + (f" seed {r}" if vals.shape[1] > 1 else ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{title} {metric}".strip())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON (NaN/inf as null), written atomically."""
    files.atomic_write(path, lambda f: json.dump(_jsonable(obj), f, indent=2), mode="w")


def write_run(workdir: str, results: Dict[str, Any], history: List[Dict[str, Any]], *, select_split: str = "val",
              title: str = "") -> None:
    write_json(os.path.join(workdir, "results.json"), results)
    write_history_csv(os.path.join(workdir, "history.csv"), history, select_split)
    if history:
        plot_curves(os.path.join(workdir, "curves.png"), history, title, select_split)


# ----------------------------------------------------------------------------
# The study's comparison table
# ----------------------------------------------------------------------------

COMPARISON_COLUMNS = [
    ("total_params", "total params", "{:,}"),
    ("trainable_params", "trainable", "{:,}"),
    ("size_bytes", "size MB", None),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("select_accuracy", "val acc", "{:.4f}"),
    ("total_time_s", "total s", "{:.1f}"),
    ("time_per_epoch_s", "s/epoch", "{:.2f}"),
    ("images_per_s", "img/s", "{:.0f}"),
    ("compile_time_s", "compile s", "{:.2f}"),
]


def _fmt(key, fmt, value):
    if value is None:
        return "null"
    if key == "size_bytes":
        return f"{value / 1e6:.3f}"
    return fmt.format(value)


def comparison_rows(results: Sequence[Dict[str, Any]], labels: Sequence[str]) -> List[Dict[str, Any]]:
    rows = []
    for label, r in zip(labels, results):
        row = {"model": label}
        for key, _, _ in COMPARISON_COLUMNS:
            row[key] = r.get("select_metrics", {}).get("accuracy") if key == "select_accuracy" else r.get(key)
        rows.append(row)
    return rows


def comparison_markdown(rows: List[Dict[str, Any]], note: str = "") -> str:
    table = tables.markdown_table(["model"] + [h for _, h, _ in COMPARISON_COLUMNS],
                                  [[row["model"]] + [_fmt(k, f, row[k]) for k, _, f in COMPARISON_COLUMNS]
                                   for row in rows])
    return (note + "\n\n" if note else "") + table


def comparison_bar_charts(path_prefix: str, rows: List[Dict[str, Any]]) -> List[str]:
    """One bar chart per column, as the study did; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, header, _ in COMPARISON_COLUMNS:
        vals = [row[key] for row in rows]
        if all(v is None for v in vals):
            continue
        fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows)), 3.5))
        ax.bar([r["model"] for r in rows], [v if v is not None else 0 for v in vals], color="C0")
        ax.set_title(header)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        fig.tight_layout()
        path = f"{path_prefix}_{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
