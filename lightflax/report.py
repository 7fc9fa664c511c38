"""Run reports: results.json, history.csv, curves.png, and the study's comparison.

results.json carries the study's columns under fixed keys (read by external
checks): total_params, trainable_params, size_bytes, test_accuracy,
total_time_s, time_per_epoch_s; plus test_loss, compile_time_s, images_per_s,
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
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

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


def build_results(*, cfg, data, counts, size_bytes, compiled, eval_compile_s, step_stats, epoch_times,
                  total_s, checkpoint_s, history, best_epoch, select_metrics, test_metrics, n_devices, steps_per_epoch,
                  summarize: Callable) -> Dict[str, Any]:
    n = cfg.num_seeds
    split_sizes = {k: (None if v is None else int(len(v.labels))) for k, v in data.splits.items()}
    notes = list(getattr(data, "notes", []))
    if test_metrics is None:
        notes.append(
            f"{data.name} has no test split here: test columns are null; the best checkpoint was selected "
            f"on '{cfg.select_split}' and its figures are reported under select_metrics, never as test figures"
        )
    median = step_stats.get("median") if step_stats else None
    # XLA's cost analysis of a partitioned program is per device; every device runs
    # the same data-parallel program, so the global step costs n_devices times that.
    flops = getattr(compiled, "flops", None)
    flops = flops * n_devices if flops is not None else None
    bytes_accessed = getattr(compiled, "bytes_accessed", None)
    bytes_accessed = bytes_accessed * n_devices if bytes_accessed is not None else None
    time_per_epoch = float(np.median(epoch_times)) if epoch_times else None
    test_summary = summarize(test_metrics) if test_metrics else {}
    sel_summary = summarize(select_metrics)
    results: Dict[str, Any] = {
        "experiment": cfg.experiment,
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": {
            "name": data.name,
            "synthetic": bool(data.synthetic),
            "source": getattr(data, "source", None),
            "num_classes": data.num_classes,
            "class_names": list(getattr(data, "class_names", []) or []),
            "splits": split_sizes,
            "stored_shape": list(data.splits["train"].images.shape[1:]),
        },
        "synthetic": bool(data.synthetic),
        "notes": notes,
        "num_seeds": n,
        # the study's columns
        "total_params": counts["total"],
        "trainable_params": counts["trainable"],
        "non_trainable_params": counts["non_trainable"],
        "size_bytes": int(np.mean(size_bytes)),
        "test_accuracy": test_summary.get("accuracy"),
        "total_time_s": total_s,
        "time_per_epoch_s": time_per_epoch,
        "checkpoint_time_s": checkpoint_s,
        # and more
        "test_loss": test_summary.get("loss"),
        "sensitivity": test_summary.get("sensitivity"),
        "specificity": test_summary.get("specificity"),
        "roc_auc": test_summary.get("roc_auc"),
        "test_metrics": test_summary or None,
        "select_split": cfg.select_split,
        "select_metrics": sel_summary,
        "best_epoch": best_epoch if n > 1 else best_epoch[0],
        "epochs_run": len(history),
        "compile_time_s": getattr(compiled, "compile_s", None),
        "lower_time_s": getattr(compiled, "lower_s", None),
        "eval_compile_s": eval_compile_s,
        "total_time_incl_compile_s": total_s + (getattr(compiled, "lower_s", 0) or 0)
        + (getattr(compiled, "compile_s", 0) or 0),
        "step_time_s": step_stats,
        "images_per_s": (cfg.batch_size * n / median) if median else None,
        "flops_per_step": flops,
        "bytes_accessed_per_step": bytes_accessed,
        "achieved_flops_per_s": (flops / median) if (flops and median) else None,
        "memory": getattr(compiled, "memory", None),
        "steps_per_epoch": steps_per_epoch,
        "batch_size": cfg.batch_size,
        "devices": device_info(),
        "versions": versions(),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "flags"},
        "flags": cfg.flags,
    }
    if n > 1:
        results["test_accuracy_std"] = test_summary.get("accuracy_std")
        results["test_loss_std"] = test_summary.get("loss_std")
        results["replicas"] = [
            {
                "seed": cfg.seed + r,
                "best_epoch": best_epoch[r],
                "size_bytes": size_bytes[r],
                "test": test_metrics[r] if test_metrics else None,
                cfg.select_split: select_metrics[r],
            }
            for r in range(n)
        ]
    return _jsonable(results)


def write_history_csv(path: str, history: List[Dict[str, Any]]) -> None:
    cols = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_s"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        n = len(history[0]["train_loss"]) if history else 1
        if n == 1:
            w.writerow(cols)
            for row in history:
                w.writerow([row["epoch"]] + [row[c][0] if isinstance(row[c], list) else row[c] for c in cols[1:]])
        else:
            w.writerow(["seed_index"] + cols)
            for row in history:
                for r in range(n):
                    w.writerow([r, row["epoch"]] + [row[c][r] if isinstance(row[c], list) else row[c] for c in cols[1:]])


def plot_curves(path: str, history: List[Dict[str, Any]], title: str = "") -> None:
    """Accuracy and loss curves (train and validation) per epoch, as the study plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for split, style in (("train", "-"), ("val", "--")):
            vals = np.array([r[f"{split}_{metric}"] for r in history], dtype=float)
            if vals.ndim == 1:
                vals = vals[:, None]
            for r in range(vals.shape[1]):
                ax.plot(epochs, vals[:, r], style, color=f"C{r}",
                        label=f"{split}" + (f" seed {r}" if vals.shape[1] > 1 else ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{title} {metric}".strip())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=2, sort_keys=False)
    os.replace(tmp, path)


def write_run(workdir: str, results: Dict[str, Any], history: List[Dict[str, Any]], title: str = "") -> None:
    write_json(os.path.join(workdir, "results.json"), results)
    write_history_csv(os.path.join(workdir, "history.csv"), history)
    if history:
        plot_curves(os.path.join(workdir, "curves.png"), history, title)


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
    head = "| model | " + " | ".join(h for _, h, _ in COMPARISON_COLUMNS) + " |"
    sep = "|---" * (len(COMPARISON_COLUMNS) + 1) + "|"
    body = [
        "| " + row["model"] + " | " + " | ".join(_fmt(k, f, row[k]) for k, _, f in COMPARISON_COLUMNS) + " |"
        for row in rows
    ]
    return "\n".join(([note, ""] if note else []) + [head, sep] + body) + "\n"


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
