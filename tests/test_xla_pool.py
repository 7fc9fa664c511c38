"""lightflax.native.xla_pool (the XLA formulation of the 2x2 max pool) against float64 NumPy and lax references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lightflax.native import xla_pool


def np_max_pool_2x2(x):
    """float64 reference: (y, argmax mask) with the FIRST maximum of each window (row-major)."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    ho, wo = h // 2, w // 2
    y = np.zeros((b, ho, wo, c))
    mask = np.zeros(x.shape, bool)
    for n, i, j, ch in itertools.product(range(b), range(ho), range(wo), range(c)):
        window = [(2 * i + di, 2 * j + dj) for di in (0, 1) for dj in (0, 1)]
        vals = [x[n, r, s, ch] for r, s in window]
        k = int(np.argmax(vals))  # first maximum
        y[n, i, j, ch] = vals[k]
        mask[(n, *window[k], ch)] = True
    return y, mask


def np_max_pool_grad(x, g):
    _, mask = np_max_pool_2x2(x)
    b, h, w, c = np.shape(x)
    dx = np.zeros((b, h, w, c))
    for n, r, s, ch in zip(*np.nonzero(mask)):
        dx[n, r, s, ch] = np.asarray(g, np.float64)[n, r // 2, s // 2, ch]
    return dx


SHAPES = [(1, 4, 6, 3), (7, 5, 7, 2), (1, 9, 8, 5), (7, 2, 3, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_numpy(shape, ties):
    x = jax.random.normal(jax.random.key(sum(shape)), shape)
    if ties:  # integer values: many windows with several equal maxima
        x = jnp.round(x)
    g = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    y, vjp = jax.vjp(xla_pool.max_pool_2x2, x)
    y_ref, _ = np_max_pool_2x2(x)
    np.testing.assert_array_equal(np.asarray(y, np.float64), y_ref)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0], np.float64), np_max_pool_grad(x, g))


@pytest.mark.parametrize("shape", SHAPES)
def test_max_pool_matches_flax_under_jit(shape):
    """Bit-identical to flax's reduce_window max pool (Keras MaxPooling2D defaults), value and gradient."""
    x = jnp.round(2 * jax.random.normal(jax.random.key(3), shape))

    def loss(pool, x):
        return jnp.sum(jnp.sin(pool(x)))

    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # noqa: E731
    v_ref, g_ref = jax.jit(jax.value_and_grad(lambda x: loss(ref, x)))(x)
    v_new, g_new = jax.jit(jax.value_and_grad(lambda x: loss(xla_pool.max_pool_2x2, x)))(x)
    np.testing.assert_array_equal(np.asarray(v_new), np.asarray(v_ref))
    np.testing.assert_array_equal(np.asarray(g_new), np.asarray(g_ref))


def test_max_pool_bfloat16_keeps_dtype():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3)).astype(jnp.bfloat16)
    y, vjp = jax.vjp(xla_pool.max_pool_2x2, x)
    assert y.dtype == jnp.bfloat16 and vjp(jnp.ones_like(y))[0].dtype == jnp.bfloat16


def test_max_pool_rejects_wrong_rank():
    with pytest.raises(ValueError, match="NHWC input of rank 4"):
        xla_pool.max_pool_2x2(jnp.zeros((4, 4, 3)))
