"""Summarises bench_runtime's JSON lines: per workload, the median wall / CPU microseconds per call
of each runtime, and the per-round ratio of the chunk pool to the OpenMP team (median, min-max).

    python benchmarks/native_runtime/summarize.py results.jsonl [more.jsonl ...]
"""

import json
import statistics
import sys
from collections import defaultdict


def main(paths):
    rows = [json.loads(line) for p in paths for line in open(p) if line.startswith("{")]
    by = defaultdict(dict)  # (workload, gap) -> {(runtime, threads, round): row}
    for r in rows:
        by[(r["workload"], r["gap_us"])][(r["runtime"], r["threads"], r["round"])] = r
    loads = [r["load1"] for r in rows]
    print(f"{len(rows)} rows, load1 {min(loads):.1f}-{max(loads):.1f}")
    print("workload gap_us | config: median wall us (cpu us) ... | pool/openmp wall per round: median [min-max]")
    for (wl, gap), d in sorted(by.items()):
        cfgs = sorted({(k[0], k[1]) for k in d})
        parts = []
        for c in cfgs:
            w = [v["wall_us"] for k, v in d.items() if (k[0], k[1]) == c]
            cpu = [v["cpu_us"] for k, v in d.items() if (k[0], k[1]) == c]
            parts.append(f"{c[0]}x{c[1]} {statistics.median(w):.1f} ({statistics.median(cpu):.1f})")
        ratios = [d[("pool", t, rd)]["wall_us"] / max(d[("openmp", t, rd)]["wall_us"], 1e-9)
                  for (rt, t, rd) in d if rt == "openmp" and ("pool", t, rd) in d]
        rs = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]" if ratios else "-"
        print(f"{wl} {gap} | " + "; ".join(parts) + f" | {rs}")


if __name__ == "__main__":
    main(sys.argv[1:])
