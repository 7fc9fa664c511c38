"""The native runtime A/B on the trainer's whole train step, interleaved in one process
(docs/native.md, "Parallel runtime"): the chunk pool against the previous OpenMP team, and one
thread, on ONE compiled step per model (the runtime and the thread count are read at call time).

    python benchmarks/native_runtime/bench_step.py --sizes=128 --batch=32 --rounds=5 --steps=3 \
        [--contend=1] [--variants=pool:2,openmp:2,pool:1] --json=OUT.json

Each round runs every variant once in turn, in an order rotated per round; per variant and round
the wall and process CPU (all threads) ms per step and the 1-minute load average are recorded.
--contend=N starts N busy processes (python -c 'while 1: pass') for the timed rounds.
Prints the per-model median ms and the per-round ratio of every variant to the first (median,
min-max).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="xray_conv2d,xray_light")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--sizes", default="128")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", default="pool:2,openmp:2,pool:1", help="runtime:threads, comma-separated")
    ap.add_argument("--contend", type=int, default=0)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    try:
        a.variants = [(v.split(":")[0], int(v.split(":")[1])) for v in a.variants.split(",")]
        a.sizes = [int(s) for s in a.sizes.split(",")]
    except (IndexError, ValueError):
        ap.error("--variants is runtime:threads,... and --sizes integers")
    return a


def time_cell(a, model, size, native, speed, timing):
    kwargs = {"k": a.k} if model == "xray_light" else {}
    v = speed.model_variant(model, kwargs, batch=a.batch, size=size)
    args = [v.args]

    def steps(n):
        for _ in range(n):
            out = timing.sync(v.compiled.compiled(*args[0]))
            args[0] = v.next_args(out, args[0])

    for rt, th in a.variants:  # warm every variant (primitives of each runtime built outside timing)
        native.set_runtime(rt)
        native.set_threads(th)
        steps(1)
    rounds = []
    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(a.contend)]
    try:
        for r in range(a.rounds):
            order = a.variants[r % len(a.variants):] + a.variants[:r % len(a.variants)]
            for rt, th in order:
                native.set_runtime(rt)
                native.set_threads(th)
                w0, c0 = time.perf_counter(), cpu_s()
                steps(a.steps)
                rounds.append({"round": r, "variant": f"{rt}:{th}", "wall_ms": 1e3 * (time.perf_counter() - w0) / a.steps,
                               "cpu_ms": 1e3 * (cpu_s() - c0) / a.steps, "load1": os.getloadavg()[0]})
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return {"model": model, "size": size, "batch": a.batch, "contend": a.contend, "rounds": rounds}


def summarize(cell, variants):
    names = [f"{rt}:{th}" for rt, th in variants]
    by = {(x["variant"], x["round"]): x for x in cell["rounds"]}
    nr = max(x["round"] for x in cell["rounds"]) + 1
    loads = [x["load1"] for x in cell["rounds"]]
    print(f"{cell['model']} {cell['size']}²/{cell['batch']} contend={cell['contend']} "
          f"load {min(loads):.1f}-{max(loads):.1f}")
    for n in names:
        w = [by[(n, r)]["wall_ms"] for r in range(nr)]
        c = [by[(n, r)]["cpu_ms"] for r in range(nr)]
        rw = [by[(n, r)]["wall_ms"] / by[(names[0], r)]["wall_ms"] for r in range(nr)]
        rc = [by[(n, r)]["cpu_ms"] / by[(names[0], r)]["cpu_ms"] for r in range(nr)]
        print(f"  {n:10s} wall {statistics.median(w):8.1f} ms  cpu {statistics.median(c):8.1f} ms  "
              f"/{names[0]}: wall {statistics.median(rw):.2f} [{min(rw):.2f}-{max(rw):.2f}] "
              f"cpu {statistics.median(rc):.2f} [{min(rc):.2f}-{max(rc):.2f}]")


def main(argv):
    a = parse_args(argv)
    import jax

    from lightflax import native, speed, timing

    if not native.available():
        print(f"native kernels not loaded: {native.status()['reason']}", file=sys.stderr)
        return 2
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": argv, "jax": jax.__version__,
           "status": native.status(), "cells": []}
    for size in a.sizes:
        for model in a.models.split(","):
            cell = time_cell(a, model, size, native, speed, timing)
            out["cells"].append(cell)
            summarize(cell, a.variants)
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
