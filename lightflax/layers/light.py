"""The LightLayers factored layers (Jha et al. 2021) and the linear low-rank baseline:
LightConv2D, LowRankConv2D, LightDense, and the reference's L2 penalty on LightConv2D kernels."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from lightflax.layers.checks import (Array, Dtype, IntPair, check_conv_fields, check_fits, check_impl,
                                     check_positive, conv_geometry, initialised_channels)
from lightflax.layers.conv import bias_and_activation, conv2d, conv_by_impl, fused_conv
from lightflax.layers.initializers import bias_initializer, glorot_uniform


class LightConv2D(nn.Module):
    """Two stacked convolutions through a rank-k bottleneck (LightLayers).

        y = relu(conv(x, w1[kh,kw,c,k], stride s) + b1)
        y = activation(conv(y, w2[kh,kw,k,f], stride s) + b2)

    As in the reference code the stride is applied in both convolutions and
    biases start glorot-uniform (``bias_init='reference'``).

    Attributes:
      features: output channels f (>= 1).
      kernel_size: (kh, kw) or an int.
      k: bottleneck rank (>= 1).
      strides: applied in BOTH convolutions, as in the reference.
      padding: 'SAME' (default) or 'VALID'.
      use_bias: add b1 and b2.
      activation: optional callable applied to the output.
      impl: 'conv' (default) or 'einsum'.
      bias_init: 'reference' (glorot_uniform, as the reference) or 'zeros'.
      dtype: computation dtype (parameters stay float32).
    """

    features: int
    kernel_size: IntPair
    k: int
    strides: IntPair = 1
    padding: str = "SAME"
    use_bias: bool = True
    activation: Optional[Callable[[Array], Array]] = None
    impl: str = "conv"
    bias_init: str = "reference"
    dtype: Optional[Dtype] = None
    precision: Any = None

    def __post_init__(self):
        check_conv_fields(self)
        check_positive(self.k, "k")
        check_impl(self.impl)
        bias_initializer(self.bias_init)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        name, kernel, strides, padding = conv_geometry(self, x, "w1")
        impl = check_impl(self.impl)
        c = x.shape[-1]
        bias_init = bias_initializer(self.bias_init)
        w1 = self.param("w1", glorot_uniform, (*kernel, c, self.k))
        w2 = self.param("w2", glorot_uniform, (*kernel, self.k, self.features))
        b1 = self.param("b1", bias_init, (self.k,)) if self.use_bias else None
        b2 = self.param("b2", bias_init, (self.features,)) if self.use_bias else None
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        if impl == "conv":  # native kernels when active: bias (and ReLU) fused into each convolution
            y = fused_conv(x, w1.astype(dtype), strides, padding, self.precision, b1, nn.relu)
        else:
            y = conv_by_impl(impl, x, w1.astype(dtype), strides, padding, self.precision)
            if b1 is not None:
                y = y + b1.astype(dtype)
            y = nn.relu(y)
        if padding == "VALID":
            check_fits(y.shape, kernel, padding, name + " (second factor)")
        if impl == "conv":
            return fused_conv(y, w2.astype(dtype), strides, padding, self.precision, b2, self.activation)
        y = conv_by_impl(impl, y, w2.astype(dtype), strides, padding, self.precision)
        if b2 is not None:
            y = y + b2.astype(dtype)
        if self.activation is not None:
            y = self.activation(y)
        return y


class LowRankConv2D(nn.Module):
    """A linearly factorised kernel (Sainath et al. 2013): W = u . v.

        W[h, w, c, f] = sum_r u[h, w, c, r] * v[r, f]

    ``form='materialize'`` (default) forms W with one einsum and runs a single
    convolution; ``form='factored'`` runs conv(x, u) then a 1x1 einsum with v.
    Both are the same linear map. The rank is ``k`` (as in LightConv2D).
    Parameters: kh*kw*c*k + k*f (+ f).
    """

    features: int
    kernel_size: IntPair
    k: int
    strides: IntPair = 1
    padding: str = "SAME"
    use_bias: bool = True
    activation: Optional[Callable[[Array], Array]] = None
    form: str = "materialize"
    dtype: Optional[Dtype] = None
    precision: Any = None

    def __post_init__(self):
        check_conv_fields(self)
        check_positive(self.k, "k")
        if self.form not in ("materialize", "factored"):
            raise ValueError(f"form must be 'materialize' or 'factored', got {self.form!r}")
        super().__post_init__()

    def materialize(self, u: Array, v: Array) -> Array:
        return jnp.einsum("hwcr,rf->hwcf", u, v, precision=self.precision)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _, kernel, strides, padding = conv_geometry(self, x, "u")
        c = x.shape[-1]
        u = self.param("u", glorot_uniform, (*kernel, c, self.k))
        v = self.param("v", glorot_uniform, (self.k, self.features))
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        u, v = u.astype(dtype), v.astype(dtype)
        if self.form == "materialize":
            return bias_and_activation(self, None, conv=(x, self.materialize(u, v), strides, padding,
                                                          self.precision))
        else:
            y = conv2d(x, u, strides, padding, precision=self.precision)
            y = jnp.einsum("bhwr,rf->bhwf", y, v, precision=self.precision)
        return bias_and_activation(self, y)


class LightDense(nn.Module):
    """Rank-k dense layer of the reference, with its sqrt(2/units) scaling.

        y = (x @ (w1 * s)) @ (w2 * s) + bias,   s = sqrt(2 / units)
    """

    features: int
    k: int = 8
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    precision: Any = None

    def __post_init__(self):
        check_positive(self.features, "features")
        check_positive(self.k, "k")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim < 1:
            raise ValueError("LightDense expects an input of rank >= 1, got a scalar")
        initialised = initialised_channels(self, "w1", 0)
        if initialised is not None and x.shape[-1] != initialised:
            raise ValueError(
                f"LightDense was initialised for {initialised} input features but got {x.shape[-1]}"
            )
        scale = math.sqrt(2.0 / self.features)
        w1 = self.param("w1", glorot_uniform, (x.shape[-1], self.k))
        w2 = self.param("w2", glorot_uniform, (self.k, self.features))
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), (w1 * scale).astype(dtype), precision=self.precision)
        y = jnp.dot(y, (w2 * scale).astype(dtype), precision=self.precision)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
        return y


def reference_l2_penalty(params, coeff: float = 1e-4) -> Array:
    """The reference's L2(coeff) kernel regulariser on LightConv2D kernels.

    Sums coeff * sum(w**2) over every 4-D ``w1``/``w2`` leaf (LightConv2D
    kernels; LightDense's 2-D w1/w2 carry no regulariser in the reference).
    """
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        key = getattr(path[-1], "key", None)
        if key in ("w1", "w2") and leaf.ndim == 4:
            total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return coeff * total
