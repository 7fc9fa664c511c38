"""Which oneDNN implementation each convolution primitive runs, for the built (or $LIGHTFLAX_NATIVE_LIB) library.

    ONEDNN_VERBOSE=1 python benchmarks/onednn_impls.py run MODEL[:K] params.npz > verbose.log
    python benchmarks/onednn_impls.py summary verbose.log    # calls, summed ms, primitive, impl, prop, problem
    python benchmarks/onednn_impls.py diff a.npz b.npz       # parameters of two builds after step 1 and step N

`run`: the trainer's train step (speed.model_variant, Adam, 128², batch 32, $T native threads, default 2)
for N (10) steps from the same seed; saves the parameters after step 1 and step N.
"""

import collections
import os
import sys

import numpy as np


def run(spec, out):
    import jax

    from lightflax import native, speed, timing

    name, _, k = spec.partition(":")
    native.set_threads(int(os.environ.get("T", "2")))
    v = speed.model_variant(name, {"k": int(k)} if k else {}, batch=32, size=128)
    args, n, snaps = v.args, int(os.environ.get("N", "10")), {}
    for i in range(n):
        o = timing.sync(v.compiled.compiled(*args))
        args = v.next_args(o, args)
        if i in (0, n - 1):
            for j, leaf in enumerate(jax.tree_util.tree_leaves(jax.device_get(args[0].params))):
                snaps[f"s{0 if i == 0 else 1}_{j}"] = np.asarray(leaf)
    np.savez(out, **snaps)
    print("oneDNN", native.status()["onednn"], file=sys.stderr)


def summary(path):
    calls, ms = collections.Counter(), collections.defaultdict(float)
    for line in open(path):
        p = line.strip().split(",")
        if len(p) < 6 or "exec" not in p[1:3]:
            continue
        if p[1] == "primitive":  # 3.x: onednn_verbose,primitive,exec,cpu,...; 2.x: onednn_verbose,exec,cpu,...
            p = p[:1] + p[2:]
        key = (p[3], p[4], p[5], p[-2])
        calls[key] += 1
        ms[key] += float(p[-1])
    for key, n in sorted(calls.items()):
        print(n, f"{ms[key]:.1f}", *key)


def diff(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    snaps = sorted({k.split("_")[0] for k in a}, key=lambda p: int(p[1:]))
    first, last = snaps[0], snaps[-1]
    for s, label in ((first, "after step 1"), (last, "after the last step")):
        ks = [k for k in a if k.startswith(s + "_")]
        top = max(float(np.abs(a[k]).max()) for k in ks)
        d = max(float(np.abs(a[k] - b[k]).max()) for k in ks)
        neq = sum(int((a[k] != b[k]).sum()) for k in ks)
        print(f"{label}: max |a - b| / max |a| = {d / top:.3g}; {neq} of {sum(a[k].size for k in ks)} values differ")


if __name__ == "__main__":
    {"run": run, "summary": summary, "diff": diff}[sys.argv[1]](*sys.argv[2:])
