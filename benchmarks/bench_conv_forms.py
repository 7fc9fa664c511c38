"""Convolution formulations at the LightLayers paper models' small shapes (fwd+bwd, batch 64):
lax.conv vs the patches einsum vs a sum of 9 per-tap einsums; interleaved rounds,
per-round ratios to lax.conv; gradients checked against lax.conv first.

    python benchmarks/bench_conv_forms.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from lightflax import layers, timing  # noqa: E402

def taps_conv(x, w, strides, padding):
    kh, kw, c, f = w.shape
    (pt, pb), (pl, pr) = layers._explicit_padding(x.shape, (kh, kw), strides, padding)
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (x.shape[1] - kh) // strides[0] + 1; wo = (x.shape[2] - kw) // strides[1] + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            t = x[:, i:i + (ho - 1) * strides[0] + 1:strides[0], j:j + (wo - 1) * strides[1] + 1:strides[1], :]
            z = jnp.einsum("bhwc,cf->bhwf", t, w[i, j])
            y = z if y is None else y + z
    return y

impls = {"conv": lambda x, w: layers.conv2d(x, w, (1, 1), "SAME"),
         "einsum": lambda x, w: layers.einsum_conv2d(x, w, (1, 1), "SAME"),
         "taps": lambda x, w: taps_conv(x, w, (1, 1), "SAME")}
for (B, H, C, F) in [(64, 28, 1, 5), (64, 28, 5, 8), (64, 28, 8, 5), (64, 14, 16, 5), (64, 14, 5, 16), (64, 7, 32, 5), (64, 7, 5, 32)]:
    x = jax.random.normal(jax.random.key(0), (B, H, H, C)); w = jax.random.normal(jax.random.key(1), (3, 3, C, F))
    fns = {k: jax.jit(jax.grad(lambda w, x, f=f: jnp.sum(jnp.square(f(x, w))), argnums=(0, 1))) for k, f in impls.items()}
    ref = fns["conv"](w, x)
    for k, f in fns.items():
        g = f(w, x); timing.sync(g)
        assert float(jnp.max(jnp.abs(g[0] - ref[0])) / jnp.max(jnp.abs(ref[0]))) < 1e-4, k
    ts = {k: [] for k in fns}
    for r in range(9):
        for k, f in fns.items():
            t0 = time.perf_counter(); timing.sync(f(w, x)); ts[k].append(time.perf_counter() - t0)
    base = np.array(ts["conv"])
    print(f"{B}x{H}x{H} {C}->{F}: conv {1e3*np.median(base):.2f} ms; " + ", ".join(
        f"{k} {np.median(np.array(ts[k]) / base):.2f}x" for k in ("einsum", "taps")), flush=True)
