"""Convolution formulations at the LightLayers paper models' small shapes (fwd+bwd, batch 64),
interleaved rounds, per-round ratios to lax.conv; gradients checked against lax.conv first:
- dense 3x3 convolutions: lax.conv vs the patches einsum vs a sum of 9 per-tap einsums;
- depthwise 3x3 (SeparableConv2D): the grouped lax.conv vs the fused taps (the default).

    python benchmarks/bench_conv_forms.py
"""

import jax
import jax.numpy as jnp
from lightflax import layers, timing


def taps_conv(x, w, strides, padding):
    """Dense convolution as a sum of per-tap einsums (the formulation tried and refuted)."""
    kh, kw, c, f = w.shape
    taps = layers.tap_slices(x, (kh, kw), strides, padding)
    return sum(jnp.einsum("bhwc,cf->bhwf", t, wt) for t, wt in zip(taps, w.reshape(kh * kw, c, f)))


def compare(impls, x, w, label, rounds=9):
    fns = {k: jax.jit(jax.grad(lambda w, x, f=f: jnp.sum(jnp.square(f(x, w))), argnums=(0, 1)))
           for k, f in impls.items()}
    ref = fns["conv"](w, x)
    for k, f in fns.items():
        g = timing.sync(f(w, x))
        assert float(jnp.max(jnp.abs(g[0] - ref[0])) / jnp.max(jnp.abs(ref[0]))) < 1e-4, k
    rows = timing.measure_interleaved([timing.Variant(k, timing.aot_compile(f, w, x), (w, x)) for k, f in fns.items()],
                                      rounds=rounds, baseline="conv")
    print(f"{label}: conv {rows[0]['median_ms']:.2f} ms; " + ", ".join(
        f"{r['variant']} {r['ratio_to_baseline']:.2f}x" for r in rows[1:]), flush=True)


dense = {"conv": lambda x, w: layers.conv2d(x, w, (1, 1), "SAME"),
         "einsum": lambda x, w: layers.einsum_conv2d(x, w, (1, 1), "SAME"),
         "taps": lambda x, w: taps_conv(x, w, (1, 1), "SAME")}
for (B, H, C, F) in [(64, 28, 1, 5), (64, 28, 5, 8), (64, 28, 8, 5), (64, 14, 16, 5), (64, 14, 5, 16),
                     (64, 7, 32, 5), (64, 7, 5, 32)]:
    compare(dense, jax.random.normal(jax.random.key(0), (B, H, H, C)),
            jax.random.normal(jax.random.key(1), (3, 3, C, F)), f"dense {B}x{H}x{H} {C}->{F}")

depthwise = {name: (lambda x, w, taps=taps: layers.depthwise_conv2d(x, w, (1, 1), "SAME", taps=taps))
             for name, taps in (("conv", False), ("taps", True))}
for (B, H, C) in [(64, 28, 8), (64, 14, 16), (64, 7, 32), (64, 32, 16)]:
    compare(depthwise, jax.random.normal(jax.random.key(0), (B, H, H, C)),
            jax.random.normal(jax.random.key(1), (3, 3, C)), f"depthwise {B}x{H}x{H}x{C}", rounds=7)
