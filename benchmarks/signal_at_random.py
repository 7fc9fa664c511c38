"""SIGTERM (or SIGINT) a small launch at a random moment of its first seconds; count exit statuses.

    python benchmarks/signal_at_random.py --trials 40 --low 0.1 --high 1.5

Each trial starts ``launch.py`` (xray_light K=2, synthetic 16x16, 3 epochs of 3 steps) and sends the
signal ``uniform(low, high)`` seconds after the start: the window of the interpreter's start, the
re-execution (lightflax/startup.py), the imports of JAX and of the experiment, and the first
compilations. Every status but 130 (interrupted) or 0 (finished before the signal) is printed with
the head of its stderr (PYTHONFAULTHANDLER=1: a crash shows where). Prints one summary line,
{"trials": N, "statuses": {...}}; exit 0 only when every status was 130 or 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--experiment=xray_light", "--k=2", "--dataset=synthetic", "--image_size=16", "--synthetic_size=32",
        "--batch_size=8", "--epochs=3", "--steps_per_epoch=3"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--low", type=float, default=0.1, help="earliest signal, seconds after the start")
    p.add_argument("--high", type=float, default=1.5, help="latest signal, seconds after the start")
    p.add_argument("--signal", choices=("SIGTERM", "SIGINT"), default="SIGTERM")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    signum = getattr(signal, a.signal)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1",
               JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONFAULTHANDLER="1")
    counts = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.trials):
            delay = rng.uniform(a.low, a.high)
            proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch.py"), *ARGS,
                                     f"--workdir={os.path.join(tmp, str(i))}"], cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signum)
            _, err = proc.communicate()
            counts[proc.returncode] += 1
            if proc.returncode not in (0, 130):
                print(f"--- {a.signal} {delay:.3f} s after the start: exit {proc.returncode}\n{err[:2500]}",
                      flush=True)
    print(json.dumps({"trials": a.trials, "signal": a.signal, "low": a.low, "high": a.high,
                      "statuses": {str(k): v for k, v in sorted(counts.items())}}))
    return 0 if set(counts) <= {0, 130} else 1


if __name__ == "__main__":
    sys.exit(main())
