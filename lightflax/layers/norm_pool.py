"""BatchNorm (Keras' defaults, optionally followed by ReLU) and 2x2 max pooling, each on the native
kernel where it is active and on XLA otherwise."""

from __future__ import annotations

from typing import Optional

from lightflax import native
from lightflax.layers.checks import Array, Dtype
from lightflax.native import xla_pool


def BatchNorm(train: bool, axis_name: Optional[str] = None, dtype: Optional[Dtype] = None, name=None,
              relu: bool = False):
    """BatchNorm with Keras' defaults (momentum 0.99, epsilon 1e-3); ``relu=True``: then ReLU (fused natively).

    :class:`lightflax.native.BatchNorm` is flax's ``nn.BatchNorm`` (same variables and
    statistics) running native kernels when they are active.

    The variance is computed in two passes, mean((x - mean)^2), as Keras'
    moments do: Flax's default one-pass E[x^2] - E[x]^2 cancels catastrophically
    when a channel's mean is large against its spread, and then 1 and 8 devices
    (different summation orders) disagree by ~0.5 % in the gradients.
    """
    return native.BatchNorm(
        use_running_average=not train,
        momentum=0.99,
        epsilon=1e-3,
        use_fast_variance=False,
        axis_name=axis_name,
        dtype=dtype,
        name=name,
        relu=relu,
    )


def max_pool_2x2(x: Array) -> Array:
    """Keras MaxPooling2D() defaults: 2x2 window, stride 2, 'valid' (floor).

    The native kernel where active, else its XLA formulation
    :func:`lightflax.native.xla_pool.max_pool_2x2`: the same values and gradients as
    ``nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')`` (ties included,
    tests/test_xla_pool.py) without XLA:CPU's select-and-scatter machinery
    (8-9 % of the X-ray train steps, docs/speed.md).
    """
    return native.max_pool_2x2(x, xla_pool.max_pool_2x2)
