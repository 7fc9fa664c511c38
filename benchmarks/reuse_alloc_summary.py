"""Summarise an A/B run of the large-block reuse layer (lightflax/reuse_alloc.py), on vs off.

    python benchmarks/peers/run_peers.py --frameworks=lightflax --lightflax_variants=reuse_alloc=0 \
        --sizes=128,224 --batch=32 --rounds=7 --steps=3 --json=benchmarks/results/reuse_alloc/ab-<date>-b32.json
    python benchmarks/reuse_alloc_summary.py benchmarks/results/reuse_alloc/ab-*.json

Per round, the mean step time of the worker with the layer (the default) over the one without;
the median and 10-90 % range over the rounds, wall and process CPU time.
"""

import json
import sys

import numpy as np


def main(paths):
    print("| run (UTC) | model | size | batch | step with / without, wall ms | ratio wall, median (10-90 %) "
          "| CPU ms with / without | ratio CPU, median (10-90 %) | rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        d = json.load(open(path))
        for c in d["cells"]:
            w = {x["name"]: x for x in c["workers"]}
            on, off = w["lightflax"], w["lightflax reuse_alloc=0"]
            row = [d["date_utc"][:16], c["model"], f"{c['size']}²", str(d["batch"])]
            for k in ("wall", "cpu"):
                a = np.array([np.mean(r[k]) for r in on["rounds"]])
                b = np.array([np.mean(r[k]) for r in off["rounds"]])
                r = a / b
                row += [f"{np.median(a) * 1e3:.0f} / {np.median(b) * 1e3:.0f}",
                        f"{np.median(r):.2f} ({np.percentile(r, 10):.2f}-{np.percentile(r, 90):.2f})"]
            row.append(str(len(on["rounds"])))
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
