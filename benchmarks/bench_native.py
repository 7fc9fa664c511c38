"""Native kernels (lightflax.native) against XLA's, interleaved in one process (docs/native.md).

    python benchmarks/bench_native.py step   # the trainer's whole train step: native (1 and 2 threads) vs xla
    python benchmarks/bench_native.py ops    # per op at the X-ray models' shapes: conv / BN / pool, fwd and fwd+bwd
    python benchmarks/bench_native.py memory # peak memory of the train step, native vs xla, one process each

Environment: SIZES (128), BATCH (64), ROUNDS (7), MODELS (xray_conv2d,xray_light:5), THREADS (1,2).

Each round runs every variant once in turn (A B C A B C ...); the table gives the
median wall ms and CPU ms (process CPU time: all threads) per call, the median
per-round ratio to XLA's kernels, and the native handler calls per call
(lightflax.native.call_counts: which kernels ran) and XLA's temporary buffers of the
compiled step (memory_analysis; the handlers' own scratch is not included). The machine may be shared:
compare ratios within one run, and CPU time beside wall time.
"""

import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

from lightflax import layers, native, speed, timing

SIZES = [int(s) for s in os.environ.get("SIZES", "128").split(",")]
BATCH = int(os.environ.get("BATCH", "64"))
ROUNDS = int(os.environ.get("ROUNDS", "7"))
MODELS = os.environ.get("MODELS", "xray_conv2d,xray_light:5").split(",")
THREADS = [int(t) for t in os.environ.get("THREADS", "1,2").split(",")]


def _header(what):
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} bench_native {what} sizes={SIZES} "
          f"batch={BATCH} rounds={ROUNDS} threads={THREADS} load={os.getloadavg()[0]:.1f} "
          f"status={native.status()['kernels']} ({native.status()['reason']})", flush=True)


class V:
    """One variant: a compiled callable, its arguments, the native thread count it runs with."""

    def __init__(self, name, fn, args, threads=None, next_args=None, group="", peak_mb=None):
        self.name, self.fn, self.args, self.threads, self.next_args = name, fn, args, threads, next_args
        self.group, self.peak_mb = group, peak_mb
        self.wall, self.cpu, self.calls, self.native_s = [], [], None, []

    def once(self):
        if self.threads:
            native.set_threads(self.threads)
        native.reset_call_counts()
        w0, c0 = time.perf_counter(), time.process_time()
        out = timing.sync(self.fn(*self.args))
        w, c = time.perf_counter() - w0, time.process_time() - c0
        self.calls = native.call_counts()
        self.native_s.append(native.call_times())
        if self.next_args:
            self.args = self.next_args(out, self.args)
        return w, c


def run_group(variants, rounds=ROUNDS):
    for v in variants:  # warm-up: compile caches, oneDNN primitive creation
        v.once()
        v.once()
    for _ in range(rounds):
        for v in variants:
            w, c = v.once()
            v.wall.append(w)
            v.cpu.append(c)
    base = next(v for v in variants if v.name.startswith("xla"))
    print("| group | variant | wall ms | CPU ms | xla/this (wall) | xla/this (CPU) | native calls | XLA temp MB |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        ratio = float(np.median(np.array(base.wall) / np.array(v.wall)))
        cratio = float(np.median(np.array(base.cpu) / np.array(v.cpu)))
        calls = " ".join(f"{k}={n}" for k, n in v.calls.items() if n) or "-"
        peak = f"{v.peak_mb:.0f}" if v.peak_mb else "-"
        print(f"| {v.group} | {v.name} | {1e3 * np.median(v.wall):.1f} | {1e3 * np.median(v.cpu):.1f} | "
              f"{ratio:.2f}x | {cratio:.2f}x | {calls} | {peak} |", flush=True)
    for v in variants:  # where the native variants' time goes: median ms per call inside each handler kind
        per = {k: 1e3 * float(np.median([t[k] for t in v.native_s[2:]])) for k in v.native_s[0]}
        inside = sum(per.values())
        if inside:
            print(f"#   {v.group} {v.name}: inside native handlers {inside:.1f} ms of {1e3 * np.median(v.wall):.1f} "
                  "(" + ", ".join(f"{k} {t:.1f}" for k, t in per.items() if t) + ")", flush=True)


def _model_spec(spec):
    name, _, k = spec.partition(":")
    return name, ({"k": int(k)} if k else {})


def step():
    _header("step")
    for size in SIZES:
        for spec in MODELS:
            model, kw = _model_spec(spec)
            group = f"{spec} {size}² b{BATCH}"
            variants = []
            for kind in ("xla", "native"):
                with native.kernels(kind):
                    v = speed.model_variant(model, kw, batch=BATCH, size=size)
                # XLA's temporaries of the compiled step (native handlers' own scratch is not in it)
                peak = (v.compiled.memory or {}).get("temp_bytes", 0) / 1e6 if v.compiled.memory else None
                if kind == "xla":
                    variants.append(V("xla", v.compiled.compiled, v.args, None, v.next_args, group, peak))
                else:
                    for i, t in enumerate(THREADS):  # own copy of the (donated) state per variant
                        args = v.args if i == 0 else (jax.tree_util.tree_map(jnp.copy, v.args[0]),) + v.args[1:]
                        variants.append(V(f"native {t} thr", v.compiled.compiled, args, t, v.next_args, group,
                                          peak))
            run_group(variants)


def _op_variants(group, make, args, grad_argnums):
    out = []
    for mode in ("fwd", "fwd+bwd"):
        for kind in ("xla", "native"):
            with native.kernels(kind):
                f = make()
                if mode == "fwd+bwd":
                    f0 = f
                    f = jax.grad(lambda *a: jnp.sum(jnp.square(f0(*a))), argnums=grad_argnums)
                fn = jax.jit(f).lower(*args).compile()
            for t in (THREADS if kind == "native" else [None]):
                out.append(V(f"{kind} {mode}" + (f" {t} thr" if t else ""), fn, args, t, group=f"{group} {mode}"))
    return out


def ops():
    _header("ops")
    key = jax.random.key(0)
    for size in SIZES:
        # (label, h, c_in, c_out, k, padding, relu): the X-ray models' convolutions at this size
        convs = [("conv2d L1", size, 3, 8, 3, "VALID", True), ("conv2d L2", size - 2, 8, 8, 3, "VALID", True),
                 ("conv2d B2", (size - 6) // 2 - 2, 16, 16, 3, "VALID", True),
                 ("light w1 K=5", size, 3, 5, 3, "SAME", True), ("light w2 K=5", size, 5, 8, 3, "SAME", False),
                 ("shortcut 1x1 K=5", size, 3, 5, 1, "SAME", True)]
        for label, h, c, o, k, padding, relu in convs:
            x = jax.random.normal(key, (BATCH, h, h, c))
            w = jax.random.normal(key, (k, k, c, o)) * 0.1
            b = jnp.zeros((o,))
            pads = layers.explicit_padding(x.shape, (k, k), (1, 1), padding)

            def make(padding=padding, relu=relu, pads=pads):
                return lambda x, w, b: native.conv2d(x, w, b, (1, 1), pads, jax.nn.relu if relu else None,
                                                     lambda x, w: layers.lax_conv2d(x, w, (1, 1), padding))

            group = f"{label} {h}²x{c}->{o}"
            vs = _op_variants(group, make, (x, w, b), (0, 1, 2))
            run_group([v for v in vs if "fwd+bwd" not in v.name])
            run_group([v for v in vs if "fwd+bwd" in v.name])
        for c in (8, 16):
            h = size - 2 if c == 8 else size // 2
            x = 2.0 + jax.random.normal(key, (BATCH, h, h, c))
            variables = layers.BatchNorm(True, relu=True).init(key, x)

            def make(variables=variables):
                return lambda x: layers.BatchNorm(True, relu=True).apply(variables, x, mutable=["batch_stats"])[0]

            vs = _op_variants(f"BN+ReLU train {h}²x{c}", make, (x,), 0)
            run_group([v for v in vs if "fwd+bwd" not in v.name])
            run_group([v for v in vs if "fwd+bwd" in v.name])
            vs = _op_variants(f"maxpool {h}²x{c}", lambda: lambda x: layers.max_pool_2x2(x), (x,), 0)
            run_group([v for v in vs if "fwd+bwd" not in v.name])
            run_group([v for v in vs if "fwd+bwd" in v.name])


def memory_one(kind, spec, size):
    """One process: build, compile and run MEM_STEPS steps of the trainer's step; print one JSON line."""
    import json
    import resource

    model, kw = _model_spec(spec)
    with native.kernels(kind):
        v = speed.model_variant(model, kw, batch=BATCH, size=int(size))
    args = v.args
    for _ in range(int(os.environ.get("MEM_STEPS", "3"))):
        out = v.compiled.compiled(*args)
        jax.block_until_ready(out)
        args = v.next_args(out, args)
    mem = v.compiled.memory or {}
    print(json.dumps({"kernels": native.status()["kernels"] if kind == "native" else "xla", "spec": spec,
                      "size": int(size), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      **{k: b / 2 ** 20 for k, b in mem.items()}}))


def memory():
    """Peak memory of the whole train step, each (model, kernels) in its own fresh process: the process's
    peak RSS (ru_maxrss: compile + MEM_STEPS steps) and XLA's memory analysis of the compiled step
    (temp = XLA's temporaries; the native handlers' thread-local scratch is inside RSS only)."""
    import json
    import subprocess

    _header("memory")
    print("| model | size | batch | kernels | process peak RSS MiB | XLA temp MiB | XLA peak MiB | XLA arguments MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for size in SIZES:
        for spec in MODELS:
            for kind in ("xla", "native"):
                proc = subprocess.run([sys.executable, __file__, "memory1", kind, spec, str(size)],
                                      capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                na = float("nan")
                print(f"| {spec} | {size}² | {BATCH} | {r['kernels']} | {r['rss_mb']:.0f} | "
                      f"{r.get('temp_bytes', na):.1f} | {r.get('peak_bytes', na):.1f} | "
                      f"{r.get('argument_bytes', na):.1f} |", flush=True)


if __name__ == "__main__":
    from lightflax import startup

    startup.reexec_if_useful()  # as launch.py (the reuse layer; huge pages opt-in: LIGHTFLAX_HUGE_PAGES=1)
    what = sys.argv[1] if len(sys.argv) > 1 else "step"
    if what == "memory1":
        memory_one(*sys.argv[2:5])
    else:
        {"step": step, "ops": ops, "memory": memory}[what]()
