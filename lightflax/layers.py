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
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from lightflax import native
from lightflax.native import xla_pool

Array = jax.Array
Dtype = Any
IntPair = Union[int, Sequence[int]]

IMPLS = ("conv", "einsum")

# ----------------------------------------------------------------------------
# Initialisers (Keras semantics)
# ----------------------------------------------------------------------------


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


def _bias_initializer(name: str) -> Callable:
    if name == "reference":
        # The reference LightConv2D creates its biases with initializer=None,
        # which Keras turns into glorot_uniform: biases start random.
        return glorot_uniform
    if name == "zeros":
        return nn.initializers.zeros
    raise ValueError(f"bias_init must be 'reference' or 'zeros', got {name!r}")


# ----------------------------------------------------------------------------
# Argument checks: one line naming the argument and the allowed range
# ----------------------------------------------------------------------------


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return value  # type: ignore[return-value]


def _check_positive(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_padding(padding: str) -> str:
    padding = padding.upper() if isinstance(padding, str) else padding
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    return padding


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _check_input(x: Array, layer: str, channels: Optional[int]) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"{layer} expects NHWC input of rank 4, got rank {x.ndim} with shape {tuple(x.shape)}"
        )
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(
            f"{layer} was initialised for {channels} input channels but got {x.shape[-1]} "
            f"(input shape {tuple(x.shape)})"
        )


def _initialised_channels(module: nn.Module, name: str, axis: int) -> Optional[int]:
    if module.has_variable("params", name):
        return module.get_variable("params", name).shape[axis]
    return None


# ----------------------------------------------------------------------------
# Convolution primitives
# ----------------------------------------------------------------------------


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


def _check_fits(
    shape: Sequence[int], kernel: Tuple[int, int], padding: str, layer: str
) -> None:
    if padding == "VALID" and (shape[1] < kernel[0] or shape[2] < kernel[1]):
        raise ValueError(
            f"{layer}: kernel_size {kernel[0]}x{kernel[1]} is larger than the input "
            f"{shape[1]}x{shape[2]} under padding='VALID'; use a larger input or padding='SAME'"
        )


def _check_conv_fields(m: nn.Module) -> None:
    """The ``__post_init__`` checks every convolution layer shares."""
    _check_positive(m.features, "features")
    _pair(m.kernel_size, "kernel_size")
    _pair(m.strides, "strides")
    _check_padding(m.padding)


def _conv_geometry(m: nn.Module, x: Array, first_param: str) -> Tuple[str, Tuple[int, int], Tuple[int, int], str]:
    """Checks ``x`` against a convolution layer; returns (name, kernel, strides, padding)."""
    name = type(m).__name__
    _check_input(x, name, _initialised_channels(m, first_param, 2))
    kernel = _pair(m.kernel_size, "kernel_size")
    padding = _check_padding(m.padding)
    _check_fits(x.shape, kernel, padding, name)
    return name, kernel, _pair(m.strides, "strides"), padding


def _bias_and_activation(m: nn.Module, y: Optional[Array], conv: Optional[tuple] = None) -> Array:
    """The Keras epilogue: + bias (zeros-initialised) if ``use_bias``, then ``activation``.

    ``conv=(x, w, strides, padding, precision)``: run the convolution here too (``y`` is None), through
    :func:`lightflax.native.conv2d` (oneDNN with bias and ReLU fused on CPU when active).
    """
    b = m.param("bias", nn.initializers.zeros, (m.features,)) if m.use_bias else None
    if conv is not None:
        return _native_conv(*conv, b, m.activation)
    if b is not None:
        y = y + b.astype(y.dtype)
    if m.activation is not None:
        y = m.activation(y)
    return y


def _native_conv(x: Array, w: Array, strides, padding: str, precision: Any, b: Optional[Array],
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
        return _native_conv(x, w, strides, padding, precision, None, None)
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


def _conv(impl: str, x: Array, w: Array, strides, padding, precision) -> Array:
    if impl == "einsum":
        return einsum_conv2d(x, w, strides, padding, precision=precision)
    return conv2d(x, w, strides, padding, precision=precision)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


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
        _check_conv_fields(self)
        _check_positive(self.k, "k")
        _check_impl(self.impl)
        _bias_initializer(self.bias_init)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        name, kernel, strides, padding = _conv_geometry(self, x, "w1")
        impl = _check_impl(self.impl)
        c = x.shape[-1]
        bias_init = _bias_initializer(self.bias_init)
        w1 = self.param("w1", glorot_uniform, (*kernel, c, self.k))
        w2 = self.param("w2", glorot_uniform, (*kernel, self.k, self.features))
        b1 = self.param("b1", bias_init, (self.k,)) if self.use_bias else None
        b2 = self.param("b2", bias_init, (self.features,)) if self.use_bias else None
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        if impl == "conv":  # native kernels when active: bias (and ReLU) fused into each convolution
            y = _native_conv(x, w1.astype(dtype), strides, padding, self.precision, b1, nn.relu)
        else:
            y = _conv(impl, x, w1.astype(dtype), strides, padding, self.precision)
            if b1 is not None:
                y = y + b1.astype(dtype)
            y = nn.relu(y)
        if padding == "VALID":
            _check_fits(y.shape, kernel, padding, name + " (second factor)")
        if impl == "conv":
            return _native_conv(y, w2.astype(dtype), strides, padding, self.precision, b2, self.activation)
        y = _conv(impl, y, w2.astype(dtype), strides, padding, self.precision)
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
        _check_conv_fields(self)
        _check_positive(self.k, "k")
        if self.form not in ("materialize", "factored"):
            raise ValueError(f"form must be 'materialize' or 'factored', got {self.form!r}")
        super().__post_init__()

    def materialize(self, u: Array, v: Array) -> Array:
        return jnp.einsum("hwcr,rf->hwcf", u, v, precision=self.precision)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _, kernel, strides, padding = _conv_geometry(self, x, "u")
        c = x.shape[-1]
        u = self.param("u", glorot_uniform, (*kernel, c, self.k))
        v = self.param("v", glorot_uniform, (self.k, self.features))
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        u, v = u.astype(dtype), v.astype(dtype)
        if self.form == "materialize":
            return _bias_and_activation(self, None, conv=(x, self.materialize(u, v), strides, padding,
                                                          self.precision))
        else:
            y = conv2d(x, u, strides, padding, precision=self.precision)
            y = jnp.einsum("bhwr,rf->bhwf", y, v, precision=self.precision)
        return _bias_and_activation(self, y)


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
        _check_positive(self.features, "features")
        _check_positive(self.k, "k")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim < 1:
            raise ValueError("LightDense expects an input of rank >= 1, got a scalar")
        initialised = _initialised_channels(self, "w1", 0)
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
        _check_conv_fields(self)
        _check_impl(self.impl)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _, kernel, strides, padding = _conv_geometry(self, x, "kernel")
        w = self.param("kernel", glorot_uniform, (*kernel, x.shape[-1], self.features))
        dtype = self.dtype or x.dtype
        impl = _check_impl(self.impl)
        if impl == "conv":
            return _bias_and_activation(self, None, conv=(x.astype(dtype), w.astype(dtype), strides, padding,
                                                                  self.precision))
        y = _conv(impl, x.astype(dtype), w.astype(dtype), strides, padding, self.precision)
        return _bias_and_activation(self, y)


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
        _check_conv_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _, kernel, strides, padding = _conv_geometry(self, x, "depthwise_kernel")
        c = x.shape[-1]
        dw = self.param("depthwise_kernel", glorot_uniform, (*kernel, c, 1))
        pw = self.param("pointwise_kernel", glorot_uniform, (1, 1, c, self.features))
        dtype = self.dtype or x.dtype
        y = depthwise_conv2d(x.astype(dtype), dw.reshape(*kernel, c).astype(dtype), strides, padding,
                             precision=self.precision, taps=self.depthwise_taps,
                             native_kernel=self.depthwise_native)
        y = jnp.einsum("bhwc,cf->bhwf", y, pw[0, 0].astype(dtype), precision=self.precision)
        return _bias_and_activation(self, y)


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
