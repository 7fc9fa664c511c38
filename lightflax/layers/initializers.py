"""Initialisers with Keras semantics: glorot_uniform for any rank, the reference's bias choice,
and a uniform sampler compiled once per power-of-two bucket of sizes."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from lightflax.layers.checks import Array, Dtype


def _keras_fans(shape: Sequence[int]) -> Tuple[float, float]:
    """Keras' ``_compute_fans``: handles 1-D (bias) shapes, unlike Flax."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1.0, 1.0
    if len(shape) == 1:
        return float(shape[0]), float(shape[0])
    if len(shape) == 2:
        return float(shape[0]), float(shape[1])
    receptive = math.prod(shape[:-2])
    return float(shape[-2] * receptive), float(shape[-1] * receptive)


_UNIFORM_MIN_BUCKET = 1 << 12


@functools.lru_cache(maxsize=None)
def _flat_uniform(n: int, dtype: Any) -> Callable:
    return jax.jit(lambda key, lo, hi: jax.random.uniform(key, (n,), dtype, lo, hi))


def uniform(key: Array, shape: Sequence[int], dtype: Dtype, minval: float, maxval: float) -> Array:
    """``jax.random.uniform(key, shape, dtype, minval, maxval)``, bit for bit, compiled once per
    power-of-two bucket of sizes instead of once per shape.

    Compiling a Threefry sampler costs XLA:CPU ~0.3-0.5 s, and a model's initialisation drew one
    per parameter shape (37 for xray_light: 18 of a run start's 20 CPU-seconds). With JAX's
    partitionable Threefry (the default) each element's bits depend only on the key and its flat
    index, so the first prod(shape) draws of a longer flat vector are exactly the draws of
    ``shape`` (tests/test_layers.py checks it, raw and typed keys, under vmap too). Other PRNG
    implementations take ``jax.random.uniform`` itself."""
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    dtype_of_key = getattr(key, "dtype", None)
    if dtype_of_key is not None and jnp.issubdtype(dtype_of_key, jax.dtypes.prng_key):  # a typed key
        impl = str(jax.random.key_impl(key))
    else:  # a raw uint32 key: the configured implementation
        impl = jax.config.jax_default_prng_impl
    fast = size > 0 and impl == "threefry2x32" and jax.config.jax_threefry_partitionable
    if not fast:
        return jax.random.uniform(key, shape, dtype, minval, maxval)
    n = max(_UNIFORM_MIN_BUCKET, 1 << (size - 1).bit_length())
    return _flat_uniform(n, jnp.dtype(dtype))(key, minval, maxval)[:size].reshape(shape)


def glorot_uniform(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    """Keras ``glorot_uniform``, defined for any rank (1-D included)."""
    fan_in, fan_out = _keras_fans(shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return uniform(key, tuple(shape), dtype, -limit, limit)


def bias_initializer(name: str) -> Callable:
    if name == "reference":
        # The reference LightConv2D creates its biases with initializer=None,
        # which Keras turns into glorot_uniform: biases start random.
        return glorot_uniform
    if name == "zeros":
        return nn.initializers.zeros
    raise ValueError(f"bias_init must be 'reference' or 'zeros', got {name!r}")
