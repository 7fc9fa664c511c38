"""Data-parallel scaling of the trainer's step: correctness and throughput, side by side.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_scaling.py devices
        1, 2, 4 and 8 devices of ONE process (meshes over the first D devices), measured in
        interleaved rounds; correctness: parameters and loss after STEPS steps from the same
        initialisation and data, each against 1 device.
    python benchmarks/bench_scaling.py processes
        2 processes x 1 device each (jax.distributed on localhost) against 1 process x 2
        simulated devices, in alternating runs (A B A B ...; PAIRS pairs); per-pair ratio.

Environment: MODEL (xray_light), K (5), SIZE (28), BATCH (64, global), ROUNDS (5), STEPS (3), PAIRS (3).
On a CPU host the simulated devices share the same cores, so "scaling" measures the overhead
of splitting the batch (collectives, smaller per-device convolutions), not a speed-up.
"""

import json
import os

import statistics
import subprocess
import sys
import time

MODEL = os.environ.get("MODEL", "xray_light")
K = int(os.environ.get("K", "5"))
SIZE = int(os.environ.get("SIZE", "28"))
BATCH = int(os.environ.get("BATCH", "64"))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
STEPS = int(os.environ.get("STEPS", "3"))
PAIRS = int(os.environ.get("PAIRS", "3"))


def _kwargs():
    return {"k": K} if MODEL in ("xray_light", "xray_lowrank", "mnist_light", "cifar_light") else {}


def devices_mode():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lightflax import speed, timing

    all_devices = jax.devices()
    counts = [d for d in (1, 2, 4, 8) if d <= len(all_devices) and BATCH % d == 0]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {MODEL} {_kwargs()} size={SIZE} "
          f"global batch={BATCH} rounds={ROUNDS} devices available={len(all_devices)} "
          f"({all_devices[0].platform})")
    variants = [speed.model_variant(MODEL, _kwargs(), batch=BATCH, size=SIZE, devices=all_devices[:d])
                for d in counts]
    # Correctness with plain SGD (momentum 0.9): Adam's first steps move every parameter by about
    # lr * sign(gradient), which amplifies float noise in gradients that are ~0 (dead ReLUs) to a
    # full step, so parameter differences after Adam steps say little about the data-parallel math.
    checks = [speed.model_variant(MODEL, _kwargs(), batch=BATCH, size=SIZE, devices=all_devices[:d],
                                  optimizer="sgd") for d in counts]
    finals = []
    for v in checks:
        args = list(v.args)
        args[0] = jax.tree_util.tree_map(jnp.copy, args[0])
        losses = []
        for _ in range(STEPS):
            out = timing.sync(v.compiled.compiled(*args))
            args[0] = out[0]
            losses.append(float(np.asarray(out[1]["loss"]).reshape(-1)[0]))
        params = np.concatenate([np.asarray(x, np.float64).ravel()
                                 for x in jax.tree_util.tree_leaves(jax.device_get(out[0].params))])
        finals.append((params, losses))
    p1, l1 = finals[0]
    rows = timing.measure_interleaved(variants, rounds=ROUNDS)
    print("| devices | per-device batch | median ms/step (Adam) | p10-p90 ms | img/s | time ratio to 1 device | "
          f"max abs param diff after {STEPS} SGD steps | p99 abs param diff | loss diff (all {STEPS} steps) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d, row, (p, losses) in zip(counts, rows, finals):
        diff = np.abs(p - p1)
        print(f"| {d} | {BATCH // d} | {row['median_ms']:.1f} | {row['p10_ms']:.1f}-{row['p90_ms']:.1f} | "
              f"{BATCH / row['median_ms'] * 1e3:.0f} | {row['ratio_to_baseline']:.3f} | {diff.max():.1e} | "
              f"{np.percentile(diff, 99):.1e} | {max(abs(a - b) for a, b in zip(losses, l1)):.1e} |")


def worker_mode(argv):
    """One timing run: ``worker NUM_PROCESSES PROCESS_ID COORDINATOR`` (NUM_PROCESSES 1: no jax.distributed)."""
    num_processes, process_id, coordinator = int(argv[0]), int(argv[1]), argv[2]
    import jax

    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    import numpy as np

    from lightflax import speed, timing

    v = speed.model_variant(MODEL, _kwargs(), batch=BATCH, size=SIZE)
    args = list(v.args)
    timer, losses = timing.StepTimer(warmup=1), []  # the trainer's step timer; the first call warms up
    for i in range(ROUNDS + 1):
        out = timer.run(v.compiled.compiled, *args)
        args[0] = out[0]
        if i:
            losses.append(float(np.asarray(out[1]["loss"]).reshape(-1)[0]))
    times = timer.measured
    if process_id == 0:
        print("RESULT " + json.dumps({"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                                      "max_ms": 1e3 * max(times), "devices": jax.device_count(),
                                      "processes": jax.process_count(), "losses": losses}), flush=True)


def _run(num_processes):
    from lightflax import parallel

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    me = os.path.abspath(__file__)
    if num_processes == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        procs = [subprocess.Popen([sys.executable, me, "worker", "1", "0", "-"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)]
    else:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        addr = f"127.0.0.1:{parallel.free_local_port()}"
        procs = [subprocess.Popen([sys.executable, me, "worker", str(num_processes), str(i), addr], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(num_processes)]
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"worker failed (exit {p.returncode}): {err.strip().splitlines()[-1:]}")
    line = next(ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def processes_mode():
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {MODEL} {_kwargs()} size={SIZE} "
          f"global batch={BATCH} rounds={ROUNDS} pairs={PAIRS}: A = 1 process x 2 devices, "
          "B = 2 processes x 1 device (jax.distributed)")
    ratios, a_ms, b_ms = [], [], []
    for i in range(PAIRS):
        a = _run(1)
        b = _run(2)
        a_ms.append(a["median_ms"])
        b_ms.append(b["median_ms"])
        ratios.append(b["median_ms"] / a["median_ms"])
        same = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        print(f"pair {i}: A {a['median_ms']:.1f} ms ({a['devices']} devices, {a['processes']} process), "
              f"B {b['median_ms']:.1f} ms ({b['devices']} devices, {b['processes']} processes), "
              f"ratio B/A {ratios[-1]:.3f}, max loss difference over {len(a['losses'])} steps {same:.2e}")
    print(f"median: A {statistics.median(a_ms):.1f} ms/step, B {statistics.median(b_ms):.1f} ms/step, "
          f"median per-pair ratio B/A {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "devices"
    if what == "devices":
        devices_mode()
    elif what == "processes":
        processes_mode()
    elif what == "worker":
        worker_mode(sys.argv[2:])
    else:
        raise SystemExit(f"unknown mode {what!r}: use devices or processes")
