"""Mean +- sample std over seeds of benchmarks/tta_eval.py's figures.

    python benchmarks/tta_summary.py SEED0.json SEED1.json SEED2.json [--csv=out.csv]

Each input is a ``tta_eval.py --out`` file (per condition), or the same figures reduced to
``{set: {option: {"clean": {...}, "shifted_mean": {...}}}}`` (seeds 0 and 1 of docs/robust.md,
transcribed from its tables: their per-condition files were not kept); prints one markdown table (clean and shifted-mean accuracy,
balanced accuracy and ROC AUC per set and option) and writes the per-seed values to --csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shift_eval import SHIFTED  # noqa: E402
from lightflax.tables import markdown_table  # noqa: E402

KEYS = ("accuracy", "balanced_accuracy", "roc_auc")


def _figure(res, where: str, key: str) -> float:
    if where == "clean":
        return res["clean"][key]
    if "shifted_mean" in res:
        return res["shifted_mean"][key]
    return float(np.mean([res[c][key] for c in SHIFTED]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args(argv)
    runs = [json.load(open(f)) for f in args.files]
    rows, flat = [], []
    for s, per in runs[0].items():
        for o in per:
            cells = []
            for where in ("clean", "shifted"):
                for k in KEYS:
                    v = [_figure(r[s][o], where, k) for r in runs]
                    flat.append([s, o, where, k] + [f"{x:.4f}" for x in v])
                    cells.append(f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
            rows.append([s, o] + cells)
    print(markdown_table(["set", "option"] + [f"{w} {k}" for w in ("clean", "shifted mean") for k in KEYS], rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([["set", "option", "where", "figure"] + [os.path.basename(x) for x in args.files]]
                                    + flat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
