"""Peer benchmark: tf.keras, PyTorch and lightflax on the study's two X-ray models.

    python benchmarks/peers/run_peers.py --peers_python=.venv-peers/bin/python --frameworks=keras,lightflax \
        --sizes=64,128,224,299 --batch=32 --rounds=5 --steps=3 [--contend=1]

One fresh worker process per (framework, model, size); parameter counts are checked
against the study's (10,141 for LightLayers K=5, 31,074 for Conv2D) before anything is
timed. Workers then run in interleaved rounds (each round: every worker runs --steps
synchronised training steps in turn, the others idle), so all frameworks see the same
machine conditions. This is one run of the measurement protocol (lightflax/timing.py):
the ratio is computed per round, and benchmarks/peers/table.py pools the rounds of
several runs into the median and 10-90 % range.

--contend=N starts N busy processes (pure Python spin loops, each bounded to
--contend_max_s seconds) after a cell's workers are built and READY, and keeps them
running during that cell's whole timed phase (all rounds, all frameworks); they are
killed when the rounds end, also on error or Ctrl-C. Interleaving makes this fair: every
framework's turns are contended alike. Whether each was still alive at the end is recorded.

The JSON (default benchmarks/results/peers/<UTC date-time>-<short commit>-b<batch>[-contend<N>].json)
records the measured commit and whether lightflax/ or benchmarks/ had uncommitted changes
(benchmarks/results/ excepted), the UTC date, the command line, the machine's state
before and after (lightflax.timing.machine_state), the contention and, per cell and
worker, the raw wall and process CPU seconds of every step of every round.
lightflax runs its default kernels (native where built); ``--lightflax_variants=kernels=xla``
adds a worker on XLA's kernels.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.insert(1, REPO)  # this checkout's lightflax

import table  # noqa: E402
from lightflax import timing  # noqa: E402

EXPECTED = {"xray_light": 10_141, "xray_conv2d": 31_074}
KERAS_ONEDNN = ["default"]  # --keras_onednn, set by main() before any worker starts
SPIN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


class Worker:
    def __init__(self, name, cmd):
        self.name = name
        env = dict(os.environ)
        if name.startswith("lightflax"):  # the lightflax of this checkout: the commit the run records
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        if name == "tf.keras" and KERAS_ONEDNN[0] != "default":  # TF's own switch; the worker reports it
            env["TF_ENABLE_ONEDNN_OPTS"] = "1" if KERAS_ONEDNN[0] == "on" else "0"
        self.proc = subprocess.Popen(cmd, cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1, env=env)
        self.info = None

    def ready(self):
        for line in self.proc.stdout:
            if line.startswith("READY "):
                self.info = json.loads(line[6:])
                return self.info
        raise RuntimeError(f"worker {self.name} died before READY (exit {self.proc.wait()})")

    def run(self, n):
        self.proc.stdin.write(f"RUN {n}\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("TIMES "):
                return json.loads(line[6:])
        raise RuntimeError(f"worker {self.name} died")

    def close(self):
        try:
            self.proc.stdin.write("QUIT\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Contenders:
    """``n`` busy processes (Python spin loops, each ending by itself after ``max_s``), killed on exit."""

    def __init__(self, n, max_s):
        self.n, self.max_s, self.procs = n, max_s, []
        self.alive_at_end = None

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN, str(self.max_s)]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        self.alive_at_end = [p.poll() is None for p in self.procs]
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        return False


def git_state():
    """(commit, dirty): HEAD of this checkout, and whether lightflax/ or benchmarks/ (results excepted)
    have uncommitted changes or untracked files."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "lightflax", "benchmarks", ":!benchmarks/results"))
    return commit, dirty


def worker_specs(a, model, size):
    """(name, command) of every worker of one cell."""
    common = [f"--model={model}", f"--k={a.k}", f"--size={size}", f"--batch={a.batch}"]
    fw, specs = a.frameworks.split(","), []
    if "keras" in fw:
        specs.append(("tf.keras", [a.peers_python, "keras_worker.py", *common]))  # env: Worker, --keras_onednn
    if "torch" in fw:
        specs.append(("torch", [a.peers_python, "torch_worker.py", *common]))
        if a.torch_compile:
            specs.append(("torch.compile", [a.peers_python, "torch_worker.py", *common, "--compile"]))
    if "lightflax" in fw:
        specs.append(("lightflax", [a.lightflax_python, "lightflax_worker.py", *common]))
        for var in filter(None, a.lightflax_variants.split(",")):
            specs.append((f"lightflax {var}", [a.lightflax_python, "lightflax_worker.py", *common, f"--{var}"]))
    return specs


def run_cell(a, model, size):
    """Builds the cell's workers one at a time (building does not overlap timing), then times them in
    interleaved rounds, contended by --contend busy processes; returns the cell's raw record."""
    workers = []
    try:
        for name, cmd in worker_specs(a, model, size):
            w = Worker(name, cmd)
            workers.append(w)
            info = w.ready()
            if info["total_params"] != EXPECTED[model]:
                raise RuntimeError(f"{name} {model}: {info['total_params']} params, expected {EXPECTED[model]}")
        rounds = {w.name: [] for w in workers}
        with Contenders(a.contend, a.contend_max_s) as contenders:
            for _ in range(a.rounds):
                for w in workers:
                    rounds[w.name].append(w.run(a.steps))
        for w in workers:
            w.close()
    finally:
        for w in workers:
            w.kill()
    return {"model": model, "size": size, "contenders_alive_at_end": contenders.alive_at_end,
            "workers": [{"name": w.name, "detail": w.info["framework"], "params": w.info["total_params"],
                         "build_s": w.info.get("build_s"), "first_step_s": w.info.get("first_step_s"),
                         "rounds": rounds[w.name]} for w in workers]}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers_python", default=sys.executable, help="python with tensorflow/tf_keras/torch")
    ap.add_argument("--lightflax_python", default=sys.executable)
    ap.add_argument("--models", default="xray_conv2d,xray_light")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--sizes", default="128,299")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--frameworks", default="keras,torch,lightflax")
    ap.add_argument("--lightflax_variants", default="", help="extra lightflax workers, e.g. impl=einsum")
    ap.add_argument("--torch_compile", action="store_true")
    ap.add_argument("--keras_onednn", choices=("default", "on", "off"), default="default",
                    help="tf.keras's oneDNN kernels: TensorFlow's default for this CPU (off on CPUs without "
                         "AVX-512 VNNI/BF16), or forced with TF_ENABLE_ONEDNN_OPTS; each worker reports its state")
    ap.add_argument("--contend", type=int, default=0, help="busy processes competing during the timed rounds")
    ap.add_argument("--contend_max_s", type=float, default=3600.0, help="each busy process ends by itself after")
    ap.add_argument("--json", default=None, help="output file (default: benchmarks/results/peers/<date>-...json)")
    a = ap.parse_args(argv)
    try:
        a.size_list = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes must be comma-separated integers, got {a.sizes!r}")
    bad = [m for m in a.models.split(",") if m not in EXPECTED]
    if bad or min(a.size_list) < 64 or a.batch < 1 or a.rounds < 1 or a.steps < 1 or a.contend < 0:
        ap.error(f"need models in {sorted(EXPECTED)} (got {bad or 'ok'}), sizes >= 64, batch, rounds and steps "
                 f">= 1, --contend >= 0")
    return a


def main(argv=None):
    a = parse_args(argv)
    KERAS_ONEDNN[0] = a.keras_onednn
    commit, dirty = git_state()
    run = {"format": table.FORMAT, "commit": commit, "dirty": dirty,
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": shlex.join([os.path.relpath(sys.argv[0], REPO), *(sys.argv[1:] if argv is None else argv)]),
           "batch": a.batch, "k": a.k, "rounds": a.rounds, "steps": a.steps, "contend": a.contend,
           "keras_onednn": a.keras_onednn, "contend_mode": "busy processes running during each cell's whole timed phase",
           "machine_before": timing.machine_state()}
    print(f"# {run['date_utc']} {commit[:10]}{' (dirty)' if dirty else ''} load {run['machine_before']['loadavg']} "
          f"batch={a.batch} rounds={a.rounds} steps/round={a.steps} contend={a.contend}", flush=True)
    run["cells"] = []
    for size in a.size_list:
        for model in a.models.split(","):
            run["cells"].append(run_cell(a, model, size))
            print(table.render([{**run, "cells": run["cells"][-1:]}]).splitlines()[-1], flush=True)
    run["machine_after"] = timing.machine_state()
    path = a.json or os.path.join(REPO, "benchmarks", "results", "peers",
                                  f"{run['date_utc'][:16].replace('-', '').replace(':', '')}Z-{commit[:7]}"
                                  f"-b{a.batch}" + (f"-contend{a.contend}" if a.contend else "") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(run, f, indent=1)
    print("\n" + table.render([run]) + f"\n# wrote {os.path.relpath(path)}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as e:
        print(f"run_peers.py: {e}", file=sys.stderr)
        sys.exit(1)
