"""Tables with error bars from finished runs: rows over seeds, mean ± std; and the study's comparison.

    python -m lightflax.tables RUNS_DIR [--metrics=test_accuracy,test_loss] [--chart=PREFIX]

Every sub-directory of RUNS_DIR holding a results.json is one run (RUNS_DIR may also be
a single run folder, holding results.json itself); runs named
``<row>_s<seed>`` are grouped into the row ``<row>`` (any other name is a row
of its own). A run trained with ``--num_seeds=N`` contributes its N replicas.
Metrics are results.json keys (``test_accuracy``, ``time_per_epoch_s``...) or
``select.<name>`` for the checkpoint-selection split's metrics
(``select.accuracy``, ``select.roc_auc``...). Standard deviations are the
sample standard deviation (ddof=1) over seeds. A metric that no run has is an error
naming the metrics that exist.

Every row shows what its figures rest on: ``synthetic`` (random images: meaningless
accuracies), ``select_split`` (``test``: the checkpoint or the callbacks saw the test split,
so the test figures are optimistic) and ``checkpoint`` (the ``best`` epoch by the selection
split's loss, or the ``last`` epoch; runs from before that entry kept the best). A row whose
runs differ in any of the three is refused (one line naming the runs): they measure
different things and their mean would be neither.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lightflax import figures
from lightflax.errors import UserError

DEFAULT_METRICS = ("test_accuracy", "test_loss")
# Per-row settings shown in every table and never averaged across (results.json keys -> column).
PROVENANCE = (("synthetic", "synthetic"), ("select_split", "select_split"), ("kept_checkpoint", "checkpoint"))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The one markdown table writer: ``header`` and rows of cells (str() of each), newline-terminated."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_SEED = re.compile(r"^(?P<row>.+)_s(?P<seed>\d+)$")


def _per_seed(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One dict per replica with flat metric keys (``select.<m>`` and top-level keys)."""
    per = r.get("replicas")
    base = {k: v for k, v in r.items() if not isinstance(v, (dict, list)) and not k.endswith("_std")}
    if isinstance(per, list) and per and isinstance(per[0], dict):
        select = (r.get("config") or {}).get("select_split", "val")
        base.update(_provenance(r))
        out = []
        for rep in per:
            d = dict(base)
            d.update({k: v for k, v in rep.items() if not isinstance(v, (dict, list))})
            for k, v in (rep.get("test") or {}).items():
                d[f"test_{k}"] = v
            for k, v in (rep.get(select) or {}).items():
                d[f"select.{k}"] = v
            out.append(d)
        return out
    d = dict(base, **_provenance(r))
    for k, v in (r.get("select_metrics") or {}).items():
        if not k.endswith("_std"):
            d[f"select.{k}"] = v
    return [d]


def _provenance(r: Dict[str, Any]) -> Dict[str, Any]:
    """synthetic, select_split and kept_checkpoint of a results.json (None: not recorded; runs
    from before kept_checkpoint existed kept the best checkpoint)."""
    dataset = r.get("dataset") if isinstance(r.get("dataset"), dict) else {}
    synthetic = r.get("synthetic", dataset.get("synthetic"))
    select = r.get("select_split") or (r.get("config") or {}).get("select_split")
    return {"synthetic": synthetic, "select_split": select, "kept_checkpoint": r.get("kept_checkpoint") or "best"}


def check_comparable(rows: Dict[str, List[Dict[str, Any]]]) -> None:
    """UserError (one line) for a row whose runs differ in synthetic, select_split or kept_checkpoint."""
    for row, reps in rows.items():
        for key, _ in PROVENANCE:
            seen: Dict[Any, List[str]] = {}
            for r in reps:
                runs = seen.setdefault(r.get(key), [])
                if r["_run"] not in runs:
                    runs.append(r["_run"])
            if len(seen) > 1:
                parts = "; ".join(f"{key}={_cell(v)} in {', '.join(runs)}" for v, runs in seen.items())
                raise UserError(f"row {row!r} mixes runs that differ in {key} ({parts}); their mean would be "
                                f"neither's: move or rename those run folders so that each row holds one setting")


def _cell(value: Any) -> str:
    return "?" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def collect(runs_dir: str) -> Dict[str, List[Dict[str, Any]]]:
    """Row name -> list of replica metric dicts, rows in name order."""
    if not os.path.isdir(runs_dir):
        raise UserError(f"{runs_dir} is not a directory: pass the folder that holds the run directories")
    rows: Dict[str, List[Dict[str, Any]]] = {}
    single = os.path.isfile(os.path.join(runs_dir, "results.json"))
    parent = os.path.dirname(os.path.abspath(runs_dir)) if single else runs_dir
    names = [os.path.basename(os.path.abspath(runs_dir))] if single else sorted(os.listdir(runs_dir))
    for name in names:
        path = os.path.join(parent, name, "results.json")
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is damaged ({e}); re-run that training or remove its directory") from None
        m = _SEED.match(name)
        row = m.group("row") if m else name
        for rep in _per_seed(r):
            rep["_run"] = name
            rows.setdefault(row, []).append(rep)
    if not rows:
        raise UserError(f"no finished runs (sub-directories with results.json) in {runs_dir}")
    return rows


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """The mean and the sample standard deviation (ddof=1; None for one value) of every spread
    this library reports: rows over seeds here, a run's seeds in its results.json."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def summarize(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "values": []}
    mean, std = mean_std(vals)
    return {"n": len(vals), "mean": mean, "std": std, "values": vals}


def check_metrics(rows: Dict[str, List[Dict[str, Any]]], metrics: Sequence[str]) -> None:
    """UserError (one line, with the metrics that exist) for a metric no run has."""
    known = {k for reps in rows.values() for r in reps for k, v in r.items()
             if not k.startswith("_") and (v is None or isinstance(v, (int, float)) and not isinstance(v, bool))}
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise UserError(f"unknown metric {', '.join(unknown)}; the runs have: {', '.join(sorted(known))}")


def table(rows: Dict[str, List[Dict[str, Any]]], metrics: Sequence[str],
          extra: Sequence[str] = ("total_params",)) -> List[Dict[str, Any]]:
    check_metrics(rows, list(metrics) + list(extra))
    check_comparable(rows)
    out = []
    for row, reps in rows.items():
        entry: Dict[str, Any] = {"row": row, "seeds": len(reps), "runs": sorted({r["_run"] for r in reps})}
        entry.update({key: reps[0].get(key) for key, _ in PROVENANCE})
        for key in extra:
            entry[key] = reps[0].get(key)
        for key in metrics:
            entry[key] = summarize([r.get(key) for r in reps])
        out.append(entry)
    return out


def _pm(s: Dict[str, Any], digits: int) -> str:
    if not s["n"]:
        return "—"
    if s["std"] is None:
        return f"{s['mean']:.{digits}f} (n=1)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(entries: List[Dict[str, Any]], metrics: Sequence[str], extra: Sequence[str] = ("total_params",),
             digits: int = 4) -> str:
    shown = ["row", "seeds", *(column for _, column in PROVENANCE)]
    head = [*shown, *extra, *metrics, "per seed (" + metrics[0] + ")"] if metrics else shown
    rows = []
    for e in entries:
        cells = [e["row"], str(e["seeds"]), *(_cell(e.get(key)) for key, _ in PROVENANCE)]
        cells += [f"{e[k]:,}" if isinstance(e[k], int) else str(e[k]) for k in extra]
        cells += [_pm(e[k], digits) for k in metrics]
        if metrics:
            cells.append(", ".join(f"{v:.{digits}f}" for v in e[metrics[0]]["values"]))
        rows.append(cells)
    return markdown_table(head, rows)


def bar_chart(path: str, entries: List[Dict[str, Any]], metric: str) -> str:
    """Bar chart of ``metric`` per row with ±1 std error bars, each bar labelled with its mean."""
    fig, ax = figures.pyplot().subplots(figsize=(max(4, 1.0 * len(entries)), 3.5))
    figures.labelled_bars(ax, [e["row"] for e in entries], [e[metric]["mean"] for e in entries],
                          [e[metric]["std"] for e in entries], "{:.4g}".format)
    ax.set_title(f"{metric} (mean ± std over seeds)")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    return figures.save(fig, path)


# ----------------------------------------------------------------------------
# The study's comparison: one row per run (xray_compare), from each run's own summary over seeds
# ----------------------------------------------------------------------------

# (row key, header, format, where it comes from: a results.json key or "select.<metric>")
COMPARISON_COLUMNS = [
    ("total_params", "total params", "{:,}", "total_params"),
    ("trainable_params", "trainable", "{:,}", "trainable_params"),
    ("size_kb", "size KB", "{:,.1f}", "size_bytes"),
    ("test_accuracy", "test acc", "{:.4f}", "test_accuracy"),
    ("test_roc_auc", "test AUC", "{:.4f}", "roc_auc"),
    ("select_accuracy", "val acc", "{:.4f}", "select.accuracy"),
    ("select_roc_auc", "val AUC", "{:.4f}", "select.roc_auc"),
    ("select_sensitivity", "val sens", "{:.4f}", "select.sensitivity"),
    ("select_specificity", "val spec", "{:.4f}", "select.specificity"),
    ("majority_baseline", "val majority", "{:.4f}", "majority"),
    ("row_wall_s", "wall s", "{:.1f}", "row_wall_s"),
    ("total_time_s", "total s", "{:.1f}", "total_time_s"),
    ("feature_extraction_s", "features s", "{:.1f}", "feature_extraction_s"),
    ("time_per_epoch_s", "s/epoch", "{:.2f}", "time_per_epoch_s"),
    ("images_per_s", "img/s", "{:.0f}", "images_per_s"),
    ("compile_time_s", "compile s", "{:.2f}", "compile_time_s"),
]
# What the time columns include (printed under the study's table).
TIME_COLUMNS_NOTE = (
    "time columns: wall s = the row's wall time in this study (compilation, training, evaluation, export; "
    "transfer: backbone loading and feature extraction too); total s = the epoch loop (training steps and the "
    "validation pass of every epoch, compilation excluded; transfer: plus feature extraction); features s = the "
    "transfer row's backbone feature extraction (0 on a cache hit); s/epoch = the epoch loop per epoch "
    "(transfer: the head's epochs on cached features, not comparable with the other rows' epochs on images)")
# A row whose model gives the same probabilities for every image: the largest standard deviation over the
# selection split's images of a class probability is below this (benchmarks/dead_init.py's threshold).
DEAD_SPREAD = 1e-6
DEAD_FLAG = "dead: constant predictions"
# The combined figure's panels: (row key, title)
FIGURE_PANELS = [("accuracy", "accuracy"), ("roc_auc", "ROC AUC"), ("total_params", "parameters"),
                 ("size_kb", "size (KB)"), ("time_per_epoch_s", "s / epoch")]


def _column_value(r: Dict[str, Any], source: str):
    """(value, std or None) of one column in one results.json."""
    if source == "majority":
        split = r.get("select_split", "val")
        return (r.get("majority_baseline") or {}).get(split), None
    if source.startswith("select."):
        sel, name = r.get("select_metrics") or {}, source.split(".", 1)[1]
        return sel.get(name), sel.get(name + "_std")
    std_key = {"test_accuracy": "test_accuracy_std", "roc_auc": None}.get(source)
    value = r.get(source)
    if source == "size_bytes" and value is not None:
        value = value / 1024
    test_std = (r.get("test_metrics") or {}).get("roc_auc_std") if source == "roc_auc" else None
    return value, r.get(std_key) if std_key else test_std


def prediction_spreads(log_probs) -> List[float]:
    """Per replica, how much a model tells images apart: the largest standard deviation, over the
    classes, of its probabilities across the images. ``log_probs``: (R, N, C) or (N, C)."""
    lp = np.asarray(log_probs, np.float64)
    lp = lp[None] if lp.ndim == 2 else lp
    return [float(np.std(np.exp(r), axis=0).max()) for r in lp]


def dead_flag(spreads: Optional[Sequence[float]]) -> Optional[str]:
    """``DEAD_FLAG`` when every replica's spread is below ``DEAD_SPREAD``, ``DEAD_FLAG (d/R seeds)`` when
    some are, None when none is (or nothing was measured)."""
    dead = sum(s < DEAD_SPREAD for s in spreads or ())
    if not dead:
        return None
    return DEAD_FLAG if dead == len(spreads) else f"{DEAD_FLAG} ({dead}/{len(spreads)} seeds)"


def comparison_rows(results: Sequence[Dict[str, Any]], labels: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per run: every column's value and, over seeds, its ``<key>_std``; plus the split
    the accuracy figures come from and ``accuracy``/``roc_auc`` (test when there is one, else
    the selection split) for the combined figure, and ``dead`` (``dead_flag`` of the run's
    ``prediction_spread``: the selection split's per-replica spreads, set by the study)."""
    rows = []
    for label, r in zip(labels, results):
        row: Dict[str, Any] = {"model": label, "select_split": r.get("select_split", "val"),
                               "prediction_spread": r.get("prediction_spread"),
                               "dead": dead_flag(r.get("prediction_spread"))}
        for key, _, _, source in COMPARISON_COLUMNS:
            row[key], std = _column_value(r, source)
            if std is not None:
                row[key + "_std"] = std
        on_test = row["test_accuracy"] is not None
        row["figure_split"] = "test" if on_test else row["select_split"]
        for name in ("accuracy", "roc_auc"):
            key = f"{'test' if on_test else 'select'}_{name}"
            row[name], row[name + "_std"] = row[key], row.get(key + "_std")
        rows.append(row)
    return rows


def _fmt(fmt: str, value, std=None) -> str:
    if value is None:
        return "null"
    return fmt.format(value) + (f" ± {fmt.format(std)}" if std is not None else "")


def comparison_markdown(rows: List[Dict[str, Any]], note: str = "") -> str:
    """The study's table; ``val`` columns are the checkpoint-selection split's, ``val majority``
    the accuracy of always predicting the training split's most frequent class."""
    select = rows[0]["select_split"] if rows else "val"
    header = ["model"] + [h.replace("val ", f"{select} ") for _, h, _, _ in COMPARISON_COLUMNS]
    table = markdown_table(header, [[_model_cell(row)] + [_fmt(f, row[k], row.get(k + "_std"))
                                                          for k, _, f, _ in COMPARISON_COLUMNS] for row in rows])
    return (note + "\n\n" if note else "") + table + "\n" + TIME_COLUMNS_NOTE + "\n"


def _model_cell(row: Dict[str, Any]) -> str:
    return f"{row['model']} ({row['dead']})" if row.get("dead") else row["model"]


def _value_label(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def comparison_figure(path: str, rows: List[Dict[str, Any]], title: str, synthetic: bool = False) -> str:
    """One figure of the comparison: accuracy, ROC AUC, parameters, size in KB and s/epoch, every
    bar labelled with its value (and error bar over seeds); ``title`` names the dataset and split."""
    fig, axes = figures.pyplot().subplots(1, len(FIGURE_PANELS),
                                          figsize=(3.2 * len(FIGURE_PANELS), 3.8 + 0.1 * len(rows)))
    for ax, (key, name) in zip(axes, FIGURE_PANELS):
        bars = figures.labelled_bars(ax, range(len(rows)), [r.get(key) for r in rows],
                                     [r.get(key + "_std") for r in rows], _value_label,
                                     color=[f"C{i}" for i in range(len(rows))])
        for bar, row in zip(bars, rows):
            if row.get("dead"):
                bar.set_hatch("xx")
                bar.set_edgecolor("black")
        split = rows[0]["figure_split"] if rows and key in ("accuracy", "roc_auc") else ""
        if key == "time_per_epoch_s" and any(r.get("feature_extraction_s") is not None for r in rows):
            name += "\n(transfer: head on cached features)"
        ax.set_title(f"{name}{f' ({split})' if split else ''}", fontsize=9)
        ax.set_xticks(range(len(rows)), [_model_cell(r).replace(" (dead", "\n(dead") for r in rows],
                      rotation=35, ha="right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return figures.save(fig, path, banner="SYNTHETIC DATA" if synthetic else None)


def comparison_bar_charts(path_prefix: str, rows: List[Dict[str, Any]], title: str = "",
                          synthetic: bool = False) -> List[str]:
    """One bar chart per column, as the study did (each bar labelled); returns the written paths."""
    paths = []
    for key, header, fmt, _ in COMPARISON_COLUMNS:
        vals = [row[key] for row in rows]
        if all(v is None for v in vals):
            continue
        fig, ax = figures.pyplot().subplots(figsize=(max(4, 1.1 * len(rows)), 3.8))
        figures.labelled_bars(ax, [r["model"] for r in rows], vals, [row.get(key + "_std") for row in rows],
                              fmt.format)
        ax.set_title(f"{header}{' - ' + title if title else ''}{' - SYNTHETIC' if synthetic else ''}", fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        paths.append(figures.save(fig, f"{path_prefix}_{key}.png"))
    return paths


def main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lightflax.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    parser.add_argument("--extra", default="total_params")
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--chart", default=None, help="write PREFIX_<metric>.png bar charts with error bars")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    extra = [m for m in args.extra.split(",") if m]
    try:
        entries = table(collect(args.runs_dir), metrics, extra)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(entries, metrics, extra, args.digits), end="")
    if args.chart:
        for m in metrics:
            print(f"wrote {bar_chart(f'{args.chart}_{m.replace(chr(46), chr(95))}.png', entries, m)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(entries, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
