"""Why xray_conv2d's first-step gradient differs (native vs XLA) by ~8e-5 of its scale: the first
layer's kernel gradient in float32 against float64 (docs/native.md, "Correctness").

    python benchmarks/native_first_layer.py [--batch=16 --size=52 --seeds=5]

The first layer (3x3, 3 -> 8 channels, VALID, bias + ReLU, then BatchNorm) sees the images,
whose values are all positive (mean ~0.5), while the gradient arriving from the BatchNorm is
orthogonal to 1 and to the normalised activations per channel: dW = sum over batch x pixels of x * g is a sum of ~40,000 terms per entry
that mostly cancel. Float32 summation of such a sum is accurate to eps * sum|x * g|, not to eps *
|dW|. This script draws g as a BatchNorm backward makes it from a random upstream gradient (then the
ReLU mask), computes dW
with XLA (lax.conv transpose), with the native kernel, and in float64 NumPy, and prints each
float32 result's error relative to max|dW64|, and the cancellation factor sum|x*g| / |dW|.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from lightflax import layers, native

jax.config.update("jax_enable_x64", False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=52)
    ap.add_argument("--seeds", type=int, default=5)
    a = ap.parse_args()
    pads = layers.explicit_padding((a.batch, a.size, a.size, 3), (3, 3), (1, 1), "VALID")
    print(f"| seed | XLA vs float64 | native vs float64 | native vs XLA | cancellation sum|x*g| / max|dW| |")
    print("|---|---|---|---|---|")
    for seed in range(a.seeds):
        rng = np.random.default_rng(seed)
        x = rng.uniform(0, 1, (a.batch, a.size, a.size, 3)).astype(np.float32)
        w = (rng.normal(size=(3, 3, 3, 8)) * 0.3).astype(np.float32)
        b = np.zeros(8, np.float32)
        y = np.asarray(layers.lax_conv2d(jnp.asarray(x), jnp.asarray(w), (1, 1), "VALID")) + b
        # the gradient a BatchNorm(ReLU(y)) passes back for a random upstream gradient u:
        # u - mean(u) - xhat * mean(u * xhat) per channel (orthogonal to 1 and xhat), then the ReLU mask
        r = np.maximum(y, 0).astype(np.float64)
        xhat = (r - r.mean(axis=(0, 1, 2))) / np.sqrt(r.var(axis=(0, 1, 2)) + 1e-3)
        u = rng.normal(size=y.shape)
        gb = u - u.mean(axis=(0, 1, 2)) - xhat * (u * xhat).mean(axis=(0, 1, 2))
        g = (gb * (y > 0)).astype(np.float32)

        def loss(kind):
            def f(w):
                with native.kernels(kind):
                    out = native.conv2d(jnp.asarray(x), w, jnp.asarray(b), (1, 1), pads, jax.nn.relu,
                                        lambda x, w: layers.lax_conv2d(x, w, (1, 1), "VALID"))
                return jnp.sum(out * jnp.asarray(g))
            return f

        dw_xla = np.asarray(jax.jit(jax.grad(loss("xla")))(jnp.asarray(w)), np.float64)
        dw_nat = np.asarray(jax.jit(jax.grad(loss("native")))(jnp.asarray(w)), np.float64)
        # float64 reference: dW[i, j, c, o] = sum_{n, p, q} x[n, p + i, q + j, c] * g[n, p, q, o]
        x64, g64 = x.astype(np.float64), g.astype(np.float64)
        oh, ow = g.shape[1], g.shape[2]
        dw64 = np.zeros((3, 3, 3, 8))
        absum = np.zeros((3, 3, 3, 8))
        for i in range(3):
            for j in range(3):
                patch = x64[:, i:i + oh, j:j + ow, :]
                dw64[i, j] = np.einsum("npqc,npqo->co", patch, g64)
                absum[i, j] = np.einsum("npqc,npqo->co", np.abs(patch), np.abs(g64))
        scale = np.max(np.abs(dw64))
        err = lambda d: np.max(np.abs(d - dw64)) / scale  # noqa: E731
        print(f"| {seed} | {err(dw_xla):.1e} | {err(dw_nat):.1e} | {np.max(np.abs(dw_nat - dw_xla)) / scale:.1e} | "
              f"{np.max(absum) / scale:.0f} |", flush=True)


if __name__ == "__main__":
    main()
