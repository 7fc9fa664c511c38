"""Line protocol between run_peers.py and a framework worker (one process each).

The worker builds its model and a train step, prints 'READY <json>' (parameter
counts, build/compile seconds), then for each line 'RUN <n>' runs n synchronised
training steps and prints 'TIMES {"wall": [seconds], "cpu": [process CPU seconds]}'; 'QUIT' ends it.
"""

import argparse
import json
import sys
import time


def parse_args(*extra):
    """The arguments every worker takes (--model --k --size --batch), plus ``extra``
    (name, kwargs) pairs of its own."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    for name, kwargs in extra:
        ap.add_argument(name, **kwargs)
    return ap.parse_args()


def serve(build):
    """build() -> (step_fn, info); step_fn() runs ONE training step and blocks until done."""
    t0 = time.perf_counter()
    step, info = build()
    info["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()  # first step: tracing / compilation, reported apart
    info["first_step_s"] = time.perf_counter() - t0
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "QUIT":
            break
        if cmd[0] == "RUN":
            wall, cpu = [], []
            for _ in range(int(cmd[1])):
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            print("TIMES " + json.dumps({"wall": wall, "cpu": cpu}), flush=True)
