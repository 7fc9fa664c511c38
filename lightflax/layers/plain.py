"""The study's plain (unfactored) convolutions, Keras-style: Conv2D and SeparableConv2D."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp
from flax import linen as nn

from lightflax.layers.checks import Array, Dtype, IntPair, check_conv_fields, check_impl, conv_geometry
from lightflax.layers.conv import bias_and_activation, conv_by_impl, depthwise_conv2d
from lightflax.layers.initializers import glorot_uniform


class Conv2D(nn.Module):
    """Keras-style Conv2D (glorot_uniform kernel, zero bias, TF padding)."""

    features: int
    kernel_size: IntPair
    strides: IntPair = 1
    padding: str = "SAME"
    use_bias: bool = True
    activation: Optional[Callable[[Array], Array]] = None
    impl: str = "conv"  # 'conv' or 'einsum', as LightConv2D
    dtype: Optional[Dtype] = None
    precision: Any = None

    def __post_init__(self):
        check_conv_fields(self)
        check_impl(self.impl)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _, kernel, strides, padding = conv_geometry(self, x, "kernel")
        w = self.param("kernel", glorot_uniform, (*kernel, x.shape[-1], self.features))
        dtype = self.dtype or x.dtype
        impl = check_impl(self.impl)
        if impl == "conv":
            return bias_and_activation(self, None, conv=(x.astype(dtype), w.astype(dtype), strides, padding,
                                                                  self.precision))
        y = conv_by_impl(impl, x.astype(dtype), w.astype(dtype), strides, padding, self.precision)
        return bias_and_activation(self, y)


class SeparableConv2D(nn.Module):
    """Keras SeparableConv2D (depth_multiplier 1): depthwise, pointwise, bias.

    Parameters kh*kw*c + c*f + f, as Keras counts them. The depthwise part: fused shifted slices
    (``depthwise_taps=True``, the default) or the grouped ``lax.conv`` (False); with
    ``depthwise_native=True`` (opt-in, less accurate kernel gradient: :func:`depthwise_conv2d`)
    oneDNN's depthwise kernels where the native kernels are active.
    """

    features: int
    kernel_size: IntPair
    strides: IntPair = 1
    padding: str = "SAME"
    use_bias: bool = True
    activation: Optional[Callable[[Array], Array]] = None
    dtype: Optional[Dtype] = None
    precision: Any = None
    depthwise_taps: bool = True
    depthwise_native: bool = False

    def __post_init__(self):
        check_conv_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _, kernel, strides, padding = conv_geometry(self, x, "depthwise_kernel")
        c = x.shape[-1]
        dw = self.param("depthwise_kernel", glorot_uniform, (*kernel, c, 1))
        pw = self.param("pointwise_kernel", glorot_uniform, (1, 1, c, self.features))
        dtype = self.dtype or x.dtype
        y = depthwise_conv2d(x.astype(dtype), dw.reshape(*kernel, c).astype(dtype), strides, padding,
                             precision=self.precision, taps=self.depthwise_taps,
                             native_kernel=self.depthwise_native)
        y = jnp.einsum("bhwc,cf->bhwf", y, pw[0, 0].astype(dtype), precision=self.precision)
        return bias_and_activation(self, y)
