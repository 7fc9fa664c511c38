"""Convolution primitives (NHWC inputs, HWIO kernels, TensorFlow padding: 'SAME' puts the extra
pixel at the bottom/right).

``conv2d`` and the layers' fused epilogue (``fused_conv``: convolution, bias, activation) run the
native kernels where they are active (:mod:`lightflax.native`: CPU, float32) and
``lax.conv_general_dilated`` elsewhere; ``einsum_conv2d`` is the factored einsum kernel
(explicit patches, one GEMM); ``depthwise_conv2d`` sums shifted slices (or runs the grouped
convolution, or oneDNN's depthwise kernels on request).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from lightflax import native
from lightflax.layers.checks import Array


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """Spatial output size of a TensorFlow-style convolution or pooling."""
    if padding == "SAME":
        return -(-size // stride)
    return (size - kernel) // stride + 1 if size >= kernel else 0


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TensorFlow 'SAME' padding (extra pixel after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def explicit_padding(
    shape: Sequence[int], kernel: Tuple[int, int], strides: Tuple[int, int], padding: str
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    if padding == "VALID":
        return (0, 0), (0, 0)
    return (
        same_padding(shape[1], kernel[0], strides[0]),
        same_padding(shape[2], kernel[1], strides[1]),
    )


def bias_and_activation(m: nn.Module, y: Optional[Array], conv: Optional[tuple] = None) -> Array:
    """The Keras epilogue: + bias (zeros-initialised) if ``use_bias``, then ``activation``.

    ``conv=(x, w, strides, padding, precision)``: run the convolution here too (``y`` is None), through
    :func:`lightflax.native.conv2d` (oneDNN with bias and ReLU fused on CPU when active).
    """
    b = m.param("bias", nn.initializers.zeros, (m.features,)) if m.use_bias else None
    if conv is not None:
        return fused_conv(*conv, b, m.activation)
    if b is not None:
        y = y + b.astype(y.dtype)
    if m.activation is not None:
        y = m.activation(y)
    return y


def fused_conv(x: Array, w: Array, strides, padding: str, precision: Any, b: Optional[Array],
                 activation) -> Array:
    """activation(conv(x, w) + b): native kernels when active (CPU, float32), else XLA's convolution."""
    pads = explicit_padding(x.shape, w.shape[:2], strides, padding)
    return native.conv2d(x, w, None if b is None else b.astype(x.dtype), strides, pads, activation,
                         lambda x, w: lax_conv2d(x, w, strides, padding, precision=precision))


def conv2d(
    x: Array,
    w: Array,
    strides: Tuple[int, int],
    padding: str,
    *,
    feature_group_count: int = 1,
    precision: Any = None,
) -> Array:
    """Plain NHWC/HWIO convolution: native kernels when active (no groups), else ``lax.conv_general_dilated``."""
    if feature_group_count == 1 and native.active():
        return fused_conv(x, w, strides, padding, precision, None, None)
    return lax_conv2d(x, w, strides, padding, feature_group_count=feature_group_count, precision=precision)


def lax_conv2d(x: Array, w: Array, strides, padding: str, *, feature_group_count: int = 1,
                precision: Any = None) -> Array:
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=strides,
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=feature_group_count,
        precision=precision,
    )


def tap_slices(x: Array, kernel: Tuple[int, int], strides: Tuple[int, int], padding: str):
    """The kh*kw strided slices (B, Ho, Wo, C) of the padded input, tap (0, 0) first, row-major."""
    kh, kw = kernel
    (pt, pb), (pl, pr) = explicit_padding(x.shape, kernel, strides, padding)
    if pt or pb or pl or pr:
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (x.shape[1] - kh) // strides[0] + 1
    wo = (x.shape[2] - kw) // strides[1] + 1
    return [
        x[:, i: i + (ho - 1) * strides[0] + 1: strides[0], j: j + (wo - 1) * strides[1] + 1: strides[1], :]
        for i in range(kh)
        for j in range(kw)
    ]


def extract_patches(
    x: Array, kernel: Tuple[int, int], strides: Tuple[int, int], padding: str
) -> Array:
    """(B, H, W, C) -> (B, Ho, Wo, kh*kw, C) by strided slices of the padded input."""
    taps = tap_slices(x, kernel, strides, padding)
    if len(taps) == 1:
        return taps[0][:, :, :, None, :]
    return jnp.stack(taps, axis=3)


def depthwise_conv2d(x: Array, w: Array, strides: Tuple[int, int], padding: str, *, precision: Any = None,
                     taps: bool = True, native_kernel: bool = False) -> Array:
    """Depthwise convolution, depth multiplier 1: x (B, H, W, C), w (kh, kw, C) -> (B, Ho, Wo, C).

    taps=True sums kh*kw shifted slices of the padded input times one weight
    vector each: elementwise work that XLA fuses, forward and backward (the
    gradients are pads and reductions), instead of a grouped convolution that
    XLA:CPU runs as one tiny convolution per channel. taps=False: the grouped
    ``lax.conv`` (feature_group_count = C), the reference.

    native_kernel=True (opt-in): oneDNN's depthwise kernels, forward and backward, where the
    native kernels are active (CPU, float32), the formulation chosen by ``taps`` elsewhere.
    1.35-2x faster separable train steps, but oneDNN sums the kernel gradient in float32 less
    accurately than XLA: cifar_separable's 1-vs-8-device check then differs by 2.6e-4 of the
    update (taps: 1e-6), so it stays off by default (docs/native.md, attempt 9).
    """
    kh, kw, c = w.shape

    def xla(x, w4):
        if not taps:
            return conv2d(x, w4, strides, padding, feature_group_count=c, precision=precision)
        y = None
        for tap, wt in zip(tap_slices(x, (kh, kw), strides, padding), w4.reshape(kh * kw, c)):
            y = tap * wt if y is None else y + tap * wt
        return y

    if not native_kernel:
        return xla(x, w.reshape(kh, kw, 1, c))
    pads = explicit_padding(x.shape, (kh, kw), strides, padding)
    return native.depthwise_conv2d(x, w.reshape(kh, kw, 1, c), None, strides, pads, None, xla)


def einsum_conv2d(
    x: Array, w: Array, strides: Tuple[int, int], padding: str, *, precision: Any = None
) -> Array:
    """The factored einsum kernel: patch extraction + one GEMM-shaped einsum."""
    kh, kw, c, f = w.shape
    patches = extract_patches(x, (kh, kw), strides, padding)
    return jnp.einsum(
        "bhwpc,pcf->bhwf", patches, w.reshape(kh * kw, c, f), precision=precision
    )


def conv_by_impl(impl: str, x: Array, w: Array, strides, padding, precision) -> Array:
    if impl == "einsum":
        return einsum_conv2d(x, w, strides, padding, precision=precision)
    return conv2d(x, w, strides, padding, precision=precision)
