"""Two builds of the native kernels (e.g. oneDNN 2.6 vs 3.2), whole train step, interleaved A/B.

    A_LIB=path/to/a.so B_LIB=path/to/b.so python benchmarks/bench_onednn_ab.py > raw.jsonl
    python benchmarks/bench_onednn_ab.py summary raw.jsonl

Environment: SIZE (128), BATCH (32), ROUNDS (5), MODELS (xray_conv2d,xray_light:5), THREADS (1,2),
STEPS (5: timed steps per thread count and block), BLOCKS (2).

A library cannot be swapped inside one process (the FFI target names are global), so each round
runs, per model, one fresh process per build ($LIGHTFLAX_NATIVE_LIB), in the order A B on even rounds
and B A on odd ones. A process compiles the trainer's train step once (speed.model_variant, native
kernels), warms up two steps per thread count, then times BLOCKS x (for each thread count: STEPS
steps, each one wall and process CPU time). Each process prints one JSON line; the summary gives,
per model and thread count, the median wall and CPU ms per step of each build and the per-round
ratio B/A (median and 10-90 % range over rounds).
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

SIZE = int(os.environ.get("SIZE", "128"))
BATCH = int(os.environ.get("BATCH", "32"))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
MODELS = os.environ.get("MODELS", "xray_conv2d,xray_light:5").split(",")
THREADS = [int(t) for t in os.environ.get("THREADS", "1,2").split(",")]
STEPS = int(os.environ.get("STEPS", "5"))
BLOCKS = int(os.environ.get("BLOCKS", "2"))


def worker(spec, side, rnd):
    import jax

    from lightflax import native, speed, timing

    st = native.status()
    if st["kernels"] != "native":
        sys.exit(f"bench_onednn_ab: side {side}: native kernels not loaded: {st['reason']}")
    name, _, k = spec.partition(":")
    v = speed.model_variant(name, {"k": int(k)} if k else {}, batch=BATCH, size=SIZE)
    args = v.args
    times = {t: {"wall": [], "cpu": []} for t in THREADS}

    def step(record=None):
        nonlocal args
        w0, c0 = time.perf_counter(), time.process_time()
        out = timing.sync(v.compiled.compiled(*args))
        w, c = time.perf_counter() - w0, time.process_time() - c0
        args = v.next_args(out, args)
        if record is not None:
            record["wall"].append(w)
            record["cpu"].append(c)

    for t in THREADS:  # warm-up: primitive creation per thread count
        native.set_threads(t)
        step()
        step()
    for _ in range(BLOCKS):
        for t in THREADS:
            native.set_threads(t)
            for _ in range(STEPS):
                step(times[t])
    print(json.dumps({"round": rnd, "side": side, "model": spec, "size": SIZE, "batch": BATCH,
                      "onednn": st["onednn"], "library": os.path.basename(st["library"]),
                      "load1": os.getloadavg()[0], "jax": jax.__version__,
                      "steps": {str(t): times[t] for t in THREADS}}), flush=True)


def drive():
    libs = {"A": os.environ["A_LIB"], "B": os.environ["B_LIB"]}
    print(json.dumps({"header": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "size": SIZE, "batch": BATCH,
                      "rounds": ROUNDS, "models": MODELS, "threads": THREADS, "steps": STEPS, "blocks": BLOCKS,
                      "libs": {s: os.path.basename(p) for s, p in libs.items()}, "nproc": os.cpu_count()}), flush=True)
    for rnd in range(ROUNDS):
        for spec in MODELS:
            for side in ("AB" if rnd % 2 == 0 else "BA"):
                env = dict(os.environ, LIGHTFLAX_NATIVE_LIB=libs[side], JAX_PLATFORMS="cpu")
                proc = subprocess.run([sys.executable, __file__, "worker", spec, side, str(rnd)], env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"bench_onednn_ab: worker {spec} {side} failed:\n{proc.stderr[-3000:]}")
                print(proc.stdout.strip().splitlines()[-1], flush=True)


def summary(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    head = rows[0]
    runs = [r for r in rows if "side" in r]
    onednn = {r["side"]: r["onednn"] for r in runs}
    print(f"# {head['header']}: A = oneDNN {onednn.get('A')}, B = oneDNN {onednn.get('B')}; {head['size']}² batch "
          f"{head['batch']}, {head['rounds']} rounds, {head['blocks']}x{head['steps']} timed steps per process and "
          f"thread count; load1 {min(r['load1'] for r in runs):.1f}-{max(r['load1'] for r in runs):.1f}")
    print("| model | threads | A wall ms | B wall ms | B/A wall: median [p10, p90] | A CPU ms | B CPU ms | "
          "B/A CPU: median [p10, p90] |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in head["models"]:
        for t in map(str, head["threads"]):
            per = {}  # (side, round) -> (median wall, median cpu) per step
            for r in runs:
                if r["model"] == spec:
                    s = r["steps"][t]
                    per[r["side"], r["round"]] = (float(np.median(s["wall"])), float(np.median(s["cpu"])))
            rounds = sorted({k[1] for k in per})
            cols = []
            for i in (0, 1):
                a = np.array([per["A", k][i] for k in rounds])
                b = np.array([per["B", k][i] for k in rounds])
                q = np.percentile(b / a, [50, 10, 90])
                cols += [f"{1e3 * np.median(a):.0f}", f"{1e3 * np.median(b):.0f}",
                         f"{q[0]:.3f} [{q[1]:.3f}, {q[2]:.3f}]"]
            print(f"| {spec} | {t} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        drive()
