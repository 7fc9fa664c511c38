"""Peer benchmark: tf.keras, PyTorch and lightflax on the study's two X-ray models.

    python benchmarks/peers/run_peers.py --peers_python=.venv-peers/bin/python \
        --sizes=128,299 --batch=64 --rounds=5 --steps=3 --lightflax_variants=kernels=xla

One long-lived worker process per (framework, model, size); parameter counts
are checked against the study's (10,141 for LightLayers K=5, 31,074 for Conv2D)
before anything is timed. Workers then run in interleaved rounds (each round:
every worker runs --steps synchronised training steps in turn, the others idle),
so all frameworks see the same machine conditions; the table reports the
median ms per step and process CPU ms per step, images/s and each framework's
ratio to the best peer (wall and CPU), computed per round and then the median.
lightflax runs its default kernels (native where built); ``--lightflax_variants=kernels=xla``
adds a worker on XLA's kernels.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED = {"xray_light": 10_141, "xray_conv2d": 31_074}


class Worker:
    def __init__(self, name, cmd):
        self.name = name
        self.proc = subprocess.Popen(cmd, cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
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


def main():
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
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} host cpus={os.cpu_count()} batch={a.batch} "
          f"rounds={a.rounds} steps/round={a.steps}", flush=True)
    results = []
    for size in (int(s) for s in a.sizes.split(",")):
        for model in a.models.split(","):
            common = [f"--model={model}", f"--k={a.k}", f"--size={size}", f"--batch={a.batch}"]
            specs = []
            fw = a.frameworks.split(",")
            if "keras" in fw:
                specs.append(("tf.keras", [a.peers_python, "keras_worker.py", *common]))
            if "torch" in fw:
                specs.append(("torch", [a.peers_python, "torch_worker.py", *common]))
                if a.torch_compile:
                    specs.append(("torch.compile", [a.peers_python, "torch_worker.py", *common, "--compile"]))
            if "lightflax" in fw:
                specs.append(("lightflax", [a.lightflax_python, "lightflax_worker.py", *common]))
                for var in filter(None, a.lightflax_variants.split(",")):
                    specs.append((f"lightflax {var}", [a.lightflax_python, "lightflax_worker.py", *common,
                                                       f"--{var}"]))
            workers = []
            for name, cmd in specs:  # one at a time: building/compiling does not overlap timing
                w = Worker(name, cmd)
                info = w.ready()
                if info["total_params"] != EXPECTED[model]:
                    raise SystemExit(f"{name} {model}: {info['total_params']} params, expected {EXPECTED[model]}")
                workers.append(w)
            times = {w.name: [] for w in workers}
            cpus = {w.name: [] for w in workers}
            for _ in range(a.rounds):
                for w in workers:
                    t = w.run(a.steps)
                    times[w.name].append(float(np.median(t["wall"])))
                    cpus[w.name].append(float(np.median(t["cpu"])))
            for w in workers:
                w.close()
            med = {n: float(np.median(t)) for n, t in times.items()}
            peers = [n for n in times if not n.startswith("lightflax")]
            best = min(peers, key=lambda n: med[n]) if peers else None
            for w in workers:
                t = np.array(times[w.name])
                ratio = float(np.median(t / np.array(times[best]))) if best else None
                c = np.array(cpus[w.name])
                cpu_ratio = float(np.median(c / np.array(cpus[best]))) if best else None
                row = {"model": model, "size": size, "framework": w.name, "detail": w.info["framework"],
                       "params": w.info["total_params"], "ms_per_step": 1e3 * med[w.name],
                       "p10_ms": 1e3 * float(np.percentile(t, 10)), "p90_ms": 1e3 * float(np.percentile(t, 90)),
                       "cpu_ms_per_step": 1e3 * float(np.median(c)), "cpu_ratio_to_best_peer": cpu_ratio,
                       "images_per_s": a.batch / med[w.name], "ratio_to_best_peer": ratio, "best_peer": best,
                       "first_step_s": w.info.get("first_step_s")}
                results.append(row)
                print(json.dumps(row), flush=True)
    print("\n| model | size | batch | framework | ms/step (median) | p10-p90 | CPU ms/step | img/s "
          "| ratio to best peer (wall) | (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['ratio_to_best_peer']:.2f}" if r["ratio_to_best_peer"] is not None else ""
        cratio = f"{r['cpu_ratio_to_best_peer']:.2f}" if r["cpu_ratio_to_best_peer"] is not None else ""
        print(f"| {r['model']} | {r['size']} | {a.batch} | {r['detail']} | {r['ms_per_step']:.0f} | "
              f"{r['p10_ms']:.0f}-{r['p90_ms']:.0f} | {r['cpu_ms_per_step']:.0f} | {r['images_per_s']:.0f} | {ratio} | "
              f"{cratio} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
