"""LightLayers and the plain layers of the study, as Flax linen modules.

Every layer takes NHWC (convolutions) or (..., features) (dense) inputs and is
jittable and differentiable. Parameter names and shapes follow the LightLayers
reference code (Jha et al. 2021), so parameter counts match Keras to the unit:

  LightConv2D     w1 (kh, kw, c, k), b1 (k,), w2 (kh, kw, k, f), b2 (f,)
  LowRankConv2D   u (kh, kw, c, k), v (k, f), bias (f,)
  LightDense      w1 (in, k), w2 (k, units), bias (units,)
  SeparableConv2D depthwise_kernel (kh, kw, c, 1), pointwise_kernel (1, 1, c, f), bias (f,)
  Conv2D          kernel (kh, kw, c, f), bias (f,)

Padding follows TensorFlow: 'SAME' puts the extra pixel at the bottom/right.

Two implementations of the convolutions are selectable with ``impl``:

  'conv'    one ``lax.conv_general_dilated`` per factor (XLA's convolution).
  'einsum'  the factored einsum kernel: explicit patch extraction (strided
            slices, no gather) and one einsum (a GEMM) per factor.

'conv' is the default on every backend (docs/speed.md, benchmarks/bench_layers.py).

The package by concern (every public name is importable from ``lightflax.layers``):

  light.py         LightConv2D, LowRankConv2D, LightDense, reference_l2_penalty
  plain.py         Conv2D, SeparableConv2D
  norm_pool.py     BatchNorm, max_pool_2x2 (native kernels where active)
  conv.py          convolution primitives: conv2d (native or XLA), depthwise, taps, patches, padding
  initializers.py  Keras initialisers (glorot_uniform, uniform)
  checks.py        argument checks (one line naming the argument)
"""

from lightflax.layers.checks import IMPLS
from lightflax.layers.conv import (conv2d, conv_output_size, depthwise_conv2d, einsum_conv2d, explicit_padding,
                                   extract_patches, lax_conv2d, same_padding, tap_slices)
from lightflax.layers.initializers import glorot_uniform, uniform
from lightflax.layers.light import LightConv2D, LightDense, LowRankConv2D, reference_l2_penalty
from lightflax.layers.norm_pool import BatchNorm, max_pool_2x2
from lightflax.layers.plain import Conv2D, SeparableConv2D

__all__ = [
    "IMPLS", "BatchNorm", "Conv2D", "LightConv2D", "LightDense", "LowRankConv2D", "SeparableConv2D", "conv2d",
    "conv_output_size", "depthwise_conv2d", "einsum_conv2d", "explicit_padding", "extract_patches",
    "glorot_uniform", "lax_conv2d", "max_pool_2x2", "reference_l2_penalty", "same_padding", "tap_slices",
    "uniform",
]
