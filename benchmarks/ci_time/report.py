"""Summarises timeline_plugin.py's files: per worker its tests, busy time and when it finished;
the test-seconds per test file, largest first.

    python benchmarks/ci_time/report.py RUN-gw0.jsonl RUN-gw1.jsonl [--top 15]
"""
import argparse
import collections
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--prefix", default="tests/", help="only tests whose id starts so (a suite that runs a toy "
                    "suite under pytest, as tests/test_suite_grouping.py does, logs the toy's tests too)")
    args = ap.parse_args()
    rows = [json.loads(line) for name in args.files for line in open(name)]
    rows = [r for r in rows if r["id"].startswith(args.prefix)]
    if not rows:
        raise SystemExit("no tests in those files")
    t0, t1 = min(r["t0"] for r in rows), max(r["t1"] for r in rows)
    print(f"{len(rows)} tests, first start to last end {(t1 - t0) / 60:.1f} min, "
          f"{sum(r['t1'] - r['t0'] for r in rows):.0f} test-seconds")
    for worker in sorted({r["w"] for r in rows}):
        mine = sorted((r for r in rows if r["w"] == worker), key=lambda r: r["t0"])
        busy = sum(r["t1"] - r["t0"] for r in mine)
        print(f"  {worker}: {len(mine)} tests, busy {busy / 60:.1f} min, CPU {sum(r['cpu'] for r in mine) / 60:.1f} min, "
              f"done at {(mine[-1]['t1'] - t0) / 60:.1f} min")
    per_file = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for r in rows:
        entry = per_file[r["id"].split("::")[0]]
        entry[0] += r["t1"] - r["t0"]
        entry[1] += r["cpu"]
        entry[2] += 1
    print(f"{'test-s':>7} {'CPU-s':>7} {'tests':>5}  file")
    for name, (wall, cpu, n) in sorted(per_file.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{wall:7.0f} {cpu:7.0f} {n:5d}  {name}")


if __name__ == "__main__":
    main()
