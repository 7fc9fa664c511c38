"""Convolution formulations at the LightLayers paper models' small shapes (fwd+bwd, batch 64),
interleaved rounds, per-round ratios to lax.conv; gradients checked against lax.conv first:
- dense 3x3 convolutions: lax.conv vs the patches einsum vs a sum of 9 per-tap einsums;
- depthwise 3x3 (SeparableConv2D): the grouped lax.conv vs the fused taps (the default).

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
    """Dense convolution as a sum of per-tap einsums (the formulation tried and refuted)."""
    kh, kw, c, f = w.shape
    taps = layers._tap_slices(x, (kh, kw), strides, padding)
    return sum(jnp.einsum("bhwc,cf->bhwf", t, wt) for t, wt in zip(taps, w.reshape(kh * kw, c, f)))


def compare(impls, x, w, label, rounds=9):
    fns = {k: jax.jit(jax.grad(lambda w, x, f=f: jnp.sum(jnp.square(f(x, w))), argnums=(0, 1)))
           for k, f in impls.items()}
    ref = fns["conv"](w, x)
    for k, f in fns.items():
        g = timing.sync(f(w, x))
        assert float(jnp.max(jnp.abs(g[0] - ref[0])) / jnp.max(jnp.abs(ref[0]))) < 1e-4, k
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            timing.sync(f(w, x))
            ts[k].append(time.perf_counter() - t0)
    base = np.array(ts["conv"])
    print(f"{label}: conv {1e3 * np.median(base):.2f} ms; " + ", ".join(
        f"{k} {np.median(np.array(ts[k]) / base):.2f}x" for k in impls if k != "conv"), flush=True)


dense = {"conv": lambda x, w: layers.conv2d(x, w, (1, 1), "SAME"),
         "einsum": lambda x, w: layers.einsum_conv2d(x, w, (1, 1), "SAME"),
         "taps": lambda x, w: taps_conv(x, w, (1, 1), "SAME")}
for (B, H, C, F) in [(64, 28, 1, 5), (64, 28, 5, 8), (64, 28, 8, 5), (64, 14, 16, 5), (64, 14, 5, 16),
                     (64, 7, 32, 5), (64, 7, 5, 32)]:
    compare(dense, jax.random.normal(jax.random.key(0), (B, H, H, C)),
            jax.random.normal(jax.random.key(1), (3, 3, C, F)), f"dense {B}x{H}x{H} {C}->{F}")

depthwise = {impl: (lambda x, w, impl=impl: layers.depthwise_conv2d(x, w, (1, 1), "SAME", impl=impl))
             for impl in ("conv", "taps")}
for (B, H, C) in [(64, 28, 8), (64, 14, 16), (64, 7, 32), (64, 32, 16)]:
    compare(depthwise, jax.random.normal(jax.random.key(0), (B, H, H, C)),
            jax.random.normal(jax.random.key(1), (3, 3, C)), f"depthwise {B}x{H}x{H}x{C}", rounds=7)
