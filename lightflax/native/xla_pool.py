"""The XLA formulation of the native 2x2 max pool: a pure-JAX max pool with a custom VJP.

:func:`lightflax.native.max_pool_2x2` runs the native kernel where it is active and this
function everywhere else (other platforms and dtypes, ``--kernels=xla``). XLA:CPU lowers the
gradient of ``lax.reduce_window`` max pooling (``select_and_scatter_add``) into a variadic
reduce-window that carries four int32 iota tensors of the full input size (argmax bookkeeping)
plus a scatter: for the X-ray Conv2D model at 128x128 that machinery took ~35 % of the train
step (docs/speed.md). :func:`max_pool_2x2` computes the same values and the same gradients
with a reshape, a max and, in the backward pass, one elementwise fusion.

Semantics are those of ``flax.linen.max_pool(x, (2, 2), strides=(2, 2),
padding='VALID')`` (Keras MaxPooling2D defaults): floor division of odd sizes,
and on ties the gradient goes to the FIRST maximal element of the window in
row-major order (as XLA's select-and-scatter with ``>=`` does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _windows(x: Array) -> Array:
    """(B, H, W, C) -> (B, H//2, 2, W//2, 2, C), dropping an odd last row/column."""
    b, h, w, c = x.shape
    ho, wo = h // 2, w // 2
    return x[:, : 2 * ho, : 2 * wo, :].reshape(b, ho, 2, wo, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: Array) -> Array:
    """2x2 max pooling with stride 2, 'VALID': (B, H, W, C) -> (B, H//2, W//2, C)."""
    if x.ndim != 4:
        raise ValueError(f"max_pool_2x2 expects NHWC input of rank 4, got shape {tuple(x.shape)}")
    return jnp.max(_windows(x), axis=(2, 4))


def _max_pool_fwd(x: Array):
    return max_pool_2x2(x), x


def _first_max_mask(win: Array, m: Array) -> Array:
    """Boolean mask (B, Ho, 2, Wo, 2, C) of the first maximal element of each window."""
    eq = win == m[:, :, None, :, None, :]
    taps = [eq[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)]
    taken = taps[0]
    first = [taps[0]]
    for t in taps[1:]:
        first.append(t & ~taken)
        taken = taken | t
    top = jnp.stack(first[:2], axis=3)  # (B, Ho, Wo, 2, C): row 0 of each window
    bottom = jnp.stack(first[2:], axis=3)
    return jnp.stack([top, bottom], axis=2)  # (B, Ho, 2, Wo, 2, C)


def _max_pool_bwd(x: Array, g: Array):
    b, h, w, c = x.shape
    win = _windows(x)
    m = jnp.max(win, axis=(2, 4))
    mask = _first_max_mask(win, m)
    dx = jnp.where(mask, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    dx = dx.reshape(b, 2 * (h // 2), 2 * (w // 2), c)
    if h % 2 or w % 2:
        dx = jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    return (dx.astype(x.dtype),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
