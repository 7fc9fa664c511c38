"""Random-kill trial: SIGKILL a small training run at a random point, --resume it, and
compare the result with an uninterrupted run bit for bit; repeated N times.

    python benchmarks/fault_injection.py --trials 20
    python benchmarks/fault_injection.py --trials 3 --epochs 2 --keep runs/faults

One uninterrupted reference run, then per trial: a run that is killed with
SIGKILL either by the debug hook (``LIGHTFLAX_FAULT_KILL_AFTER_STEP``, after a
random training step) or from outside at a random time after compilation (which
can land inside a checkpoint save or the export), then ``--resume`` until the run
ends with exit 0. A trial passes when model.msgpack is byte-identical to the
reference's and results.json's selection and test metrics and history.csv's per-epoch losses
and accuracies are equal (timings excluded). Synthetic 16x16 data; prints one JSON line
per trial and a summary line: {"trials": N, "passed": P, ...}. Exit 0 only when
every trial passed.

The model is xray_light K=5 (--k), alive at initialisation: a dead network (K=1 with
seed 0, benchmarks/dead_init.py) gets no gradient below its dead ReLUs, so a resume that
restored those layers wrongly would still compare equal. The reference model's spread
of predictions across inputs (lightflax.predict.prediction_spread) is checked and
reported; a dead reference stops the trial with exit 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's lightflax (the runs use it through PYTHONPATH)
KILL_ENV = "LIGHTFLAX_FAULT_KILL_AFTER_STEP"  # lightflax._testing.FAULT_KILL_ENV (read by the child run)
COMPARED = ("select_metrics", "test_accuracy", "test_loss", "epochs_run", "best_epoch")


def _args(ns, workdir: str):
    return [sys.executable, os.path.join(REPO, "launch.py"), "--experiment=xray_light", f"--k={ns.k}",
            "--dataset=synthetic", "--image_size=16", f"--synthetic_size={ns.synthetic_size}",
            f"--batch_size={ns.batch_size}", f"--epochs={ns.epochs}", f"--workdir={workdir}"]


def _env():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(KILL_ENV, None)
    return env


def _fingerprint(workdir: str) -> dict:
    with open(os.path.join(workdir, "model.msgpack"), "rb") as f:
        model = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(workdir, "history.csv")) as f:
        rows = [{k: v for k, v in row.items() if not k.endswith("_s")} for row in csv.DictReader(f)]
    return {"model_sha256": model, "history": rows, **{k: results.get(k) for k in COMPARED}}


def _killed_run(ns, workdir: str, rng: random.Random, steps: int, loop_s: float) -> dict:
    """Starts a fresh run and SIGKILLs it; returns how."""
    if rng.random() < 0.5:
        step = rng.randrange(1, steps)
        proc = subprocess.run(_args(ns, workdir), env=dict(_env(), **{KILL_ENV: str(step)}), cwd=REPO,
                              capture_output=True, text=True)
        return {"how": "hook", "after_step": step, "rc": proc.returncode}
    delay = rng.uniform(0.0, loop_s)
    proc = subprocess.Popen(_args(ns, workdir), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # the clock starts once the step is compiled
        if line.startswith("compiled train step"):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.stdout.close()
    return {"how": "external", "after_s": round(delay, 3), "rc": proc.wait()}


def _resume(ns, workdir: str) -> int:
    """--resume until exit 0 (a kill before the first checkpoint leaves nothing to resume from)."""
    for attempt in range(1, 4):
        proc = subprocess.run(_args(ns, workdir) + ["--resume"], env=_env(), cwd=REPO, capture_output=True,
                              text=True)
        if proc.returncode == 0:
            return attempt
        sys.stderr.write(proc.stderr[-2000:])
    raise RuntimeError(f"--resume of {workdir} failed 3 times")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--synthetic_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--k", type=int, default=5, help="LightLayers rank: a model alive at init")
    parser.add_argument("--seed", type=int, default=0, help="of the kill points")
    parser.add_argument("--keep", default=None, help="folder for the runs (default: a temporary one, removed)")
    ns = parser.parse_args()
    root = ns.keep or tempfile.mkdtemp(prefix="lightflax-faults-")
    os.makedirs(root, exist_ok=True)
    rng = random.Random(ns.seed)
    load_before = os.getloadavg()
    reference = os.path.join(root, "reference")
    shutil.rmtree(reference, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(_args(ns, reference), env=_env(), cwd=REPO, check=True, capture_output=True)
    with open(os.path.join(reference, "results.json")) as f:
        ref_results = json.load(f)
    want = _fingerprint(reference)
    from lightflax import predict

    spread = predict.prediction_spread(reference)
    if spread <= 1e-6:
        print(f"error: the reference model (--k={ns.k}) is dead (probability spread {spread:.1e}): a wrong "
              f"restore could not show; choose another --k", file=sys.stderr)
        return 2
    steps = ns.epochs * (ns.synthetic_size // ns.batch_size)
    loop_s = float(ref_results.get("total_time_s") or 1.0) + 1.0  # + test evaluation and export
    passed = 0
    for trial in range(ns.trials):
        workdir = os.path.join(root, f"trial{trial}")
        shutil.rmtree(workdir, ignore_errors=True)
        kill = _killed_run(ns, workdir, rng, steps, loop_s)
        finished = os.path.exists(os.path.join(workdir, "results.json")) and kill["rc"] == 0
        attempts = 0 if finished else _resume(ns, workdir)
        ok = _fingerprint(workdir) == want
        passed += ok
        print(json.dumps({"trial": trial, **kill, "resumes": attempts, "identical": ok}), flush=True)
        if not ns.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = {"trials": ns.trials, "passed": passed, "epochs": ns.epochs, "steps": steps, "k": ns.k,
               "reference_spread": spread,
               "command": "python benchmarks/fault_injection.py " + " ".join(sys.argv[1:]),
               "date": datetime.date.today().isoformat(), "wall_s": round(time.perf_counter() - t0, 1),
               "commit": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True).stdout.strip(),
               "jax_disable_most_optimizations": os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS"),
               "load_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(summary), flush=True)
    if not ns.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if passed == ns.trials else 1


if __name__ == "__main__":
    sys.exit(main())
