"""Squeeze-and-excitation A/B on the X-ray models: per-replica CSV and a median [min, max] table.

    python benchmarks/se_table.py benchmarks/results/se        # prints the table, writes se.csv there

Reads every ``<arm>/results.json`` under the folder (a ``--num_seeds=3`` run each: its replicas are the
seeds), writes ``se.csv`` (one line per replica: validation accuracy, ROC AUC, loss, best epoch) and
prints a markdown table per arm (median and [min, max] over the seeds; s/epoch of the run, all
replicas trained together) and, per model, the paired SE - no-SE difference seed by seed. "helps"
only when every seed's difference is > 0, "hurts" when every one is < 0, else "not established".
Validation figures of the checkpoint selected on that same split (optimistic by construction).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys

FIELDS = ("arm", "model", "se_ratio", "image_size", "epochs", "seed", "best_epoch", "val_accuracy",
          "val_roc_auc", "val_loss", "total_params", "trainable_params", "time_per_epoch_s")


def replicas(folder: str):
    for arm in sorted(os.listdir(folder)):
        path = os.path.join(folder, arm, "results.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            r = json.load(f)
        cfg = r["config"]
        split = cfg.get("select_split", "val")
        for rep in r["replicas"]:
            m = rep[split]
            yield {"arm": arm, "model": r["model"], "se_ratio": cfg["model_kwargs"].get("se_ratio", 0.0),
                   "image_size": cfg["image_size"], "epochs": cfg["epochs"], "seed": rep["seed"],
                   "best_epoch": rep["best_epoch"], "val_accuracy": m["accuracy"], "val_roc_auc": m["roc_auc"],
                   "val_loss": m["loss"], "total_params": r["total_params"],
                   "trainable_params": r["trainable_params"], "time_per_epoch_s": r["time_per_epoch_s"]}


def spread(values, digits=4) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def verdict(diffs) -> str:
    return "helps" if min(diffs) > 0 else "hurts" if max(diffs) < 0 else "not established"


def main(folder: str) -> int:
    rows = list(replicas(folder))
    with open(os.path.join(folder, "se.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    arms = {}
    for row in rows:
        arms.setdefault((row["model"], row["se_ratio"]), []).append(row)
    print("| model | SE ratio | input | epochs | total params | val accuracy | val ROC AUC | val loss | "
          "s/epoch (3 replicas) |\n|---|---|---|---|---|---|---|---|---|")
    for (model, ratio), rs in sorted(arms.items()):
        print(f"| {model} | {ratio:g} | {rs[0]['image_size']} | {rs[0]['epochs']} | {rs[0]['total_params']:,} | "
              f"{spread([r['val_accuracy'] for r in rs])} | {spread([r['val_roc_auc'] for r in rs])} | "
              f"{spread([r['val_loss'] for r in rs])} | {rs[0]['time_per_epoch_s']:.1f} |")
    print("\n| model | SE - no SE, per seed (accuracy) | (ROC AUC) | accuracy | AUC |\n|---|---|---|---|---|")
    for (model, ratio), rs in sorted(arms.items()):
        base = {r["seed"]: r for r in arms.get((model, 0.0), [])}
        if ratio == 0 or set(base) != {r["seed"] for r in rs}:
            continue
        da = [r["val_accuracy"] - base[r["seed"]]["val_accuracy"] for r in rs]
        du = [r["val_roc_auc"] - base[r["seed"]]["val_roc_auc"] for r in rs]
        print(f"| {model} + SE {ratio:g} | {', '.join(f'{d:+.4f}' for d in da)} | "
              f"{', '.join(f'{d:+.4f}' for d in du)} | {verdict(da)} | {verdict(du)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/se"))
