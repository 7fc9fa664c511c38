"""Two study rows' train steps: one after the other with 2 native threads per call (the default of a
sequential study), one after the other with 1, and at the same time on two Python threads with 1
each (xray_compare --concurrent_rows=2). Each mode runs in a fresh process; rounds interleave
the modes; wall and process CPU time of the timed steps are recorded with the load average.

    python benchmarks/row_threads.py --rounds 3
    python benchmarks/row_threads.py --k 5 --size 28 --steps 64

Writes benchmarks/results/study_time/row_threads-<UTC time>.json and prints one line per run.
The model and input are a study row's (xray_light K=5 at 28 px, batch 32, Adam) on synthetic
images; the steps are the compiled train step called directly (no evaluation, no checkpoints).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = (("sequential", 2), ("concurrent", 1), ("sequential", 1))

CHILD = r"""
import json, os, resource, sys, threading, time
import jax
from lightflax import data, native, train
from lightflax.config import RunConfig
mode, threads, k, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
native.set_threads(threads)
d = data.load("synthetic", synthetic_shape=(size, size, 1), synthetic_sizes={"train": 1024, "val": 16, "test": 16},
              num_classes=2, seed=0)
def make(seed):
    cfg = RunConfig.flat(workdir="unused", model="xray_light", model_kwargs={"k": k}, batch_size=32,
                         image_size=size, channels=3, seed=seed)
    tr = train.Trainer(cfg, d)
    st, keys, (im, lb), perm = tr.init_state(), tr.data_keys(), tr.device_split("train"), tr.permutations(0)
    return [tr.train_step.lower(st, im, lb, perm, keys, tr.dev_ids).compile(), st, im, lb, perm, keys, tr.dev_ids]
rows = [make(0), make(1)]
def run(r, n):
    c, st, im, lb, perm, keys, ids = r
    for _ in range(n):
        st, m = c(st, im, lb, perm, keys, ids)
        jax.block_until_ready(m)
    r[1] = st
for r in rows:
    run(r, 3)  # warm-up
load = os.getloadavg()[0]
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
if mode == "sequential":
    for r in rows:
        run(r, steps)
else:
    ts = [threading.Thread(target=run, args=(r, steps)) for r in rows]
    [t.start() for t in ts]
    [t.join() for t in ts]
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
print(json.dumps({"mode": mode, "native_threads": threads, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                  "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--steps", type=int, default=64, help="timed steps per row")
    p.add_argument("--note", default="")
    ns = p.parse_args()
    env = dict(os.environ, PYTHONPATH=REPO)
    runs = []
    for rnd in range(ns.rounds):
        for mode, threads in MODES:
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(threads), str(ns.k), str(ns.size),
                                  str(ns.steps)], env=env, capture_output=True, text=True, check=True)
            runs.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), round=rnd))
            print(json.dumps(runs[-1]), flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    record = {"date_utc": stamp.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit, "k": ns.k, "size": ns.size,
              "batch": 32, "steps_per_row": ns.steps, "rows": 2, "note": ns.note,
              "command": "python benchmarks/row_threads.py " + " ".join(sys.argv[1:]), "runs": runs}
    out_dir = os.path.join(REPO, "benchmarks", "results", "study_time")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"row_threads-{stamp.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
