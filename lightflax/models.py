"""The study's model zoo and a name registry.

    >>> model = lightflax.models.create("xray_light", k=5)        # by name (the registry)
    >>> model = ResidualNet(conv=partial(layers.LightConv2D, k=5))  # or by injecting the layers
    >>> variables = model.init(rng, jnp.zeros((1, 299, 299, 3)), train=False)
    >>> logits = model.apply(variables, images, train=False)

Every model takes float NHWC images and returns LOGITS (the study's models
ended in softmax and then used a from_logits loss; see BUILD_NOTES.md, "Deviations").
Variables are ``{'params', 'batch_stats'}``; parameter counts match Keras
(BatchNorm moving statistics are the non-trainable ones).

Registered (see :func:`names`):

  xray_light      LightLayers residual net, filters (8, 16, 32), Dense head (seed study)
  xray_conv2d     3 x [Conv2D VALID relu -> BN] per block, filters (8, 16, 32) (seed study)
  xray_lowrank    xray_light with LowRankConv2D (linear factorisation) instead of LightConv2D
  mnist_conv2d / mnist_separable / mnist_light      paper Tables 1-2 (28x28x1)
  cifar_conv2d / cifar_separable / cifar_light      paper Table 4 (32x32x3, residual)

Every zoo model takes ``se_ratio`` (0 = off, the default: the published architectures):
squeeze-and-excitation (:class:`SqueezeExcite`) with a bottleneck of floor(C * se_ratio) channels
on each block, where SENet puts it: on the residual branch before the addition (ResidualNet), after
the block's last convolution (+ BatchNorm) before its pooling (PlainNet, which has no residual path).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from lightflax import layers
from lightflax.errors import UserError

Array = jax.Array

# A convolution constructor: conv(features, kernel_size, padding=..., activation=..., dtype=..., name=...)
# -> an nn.Module, e.g. partial(layers.LightConv2D, k=5). A head constructor: head(num_classes, name=...).
ConvFactory = Callable[..., nn.Module]
DenseHead = functools.partial(nn.Dense, kernel_init=layers.glorot_uniform)


def _check_image(x: Array, model: str, in_channels: Optional[int]) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"{model} expects NHWC images of rank 4, got rank {x.ndim} with shape {tuple(x.shape)}"
        )
    if in_channels is not None and x.shape[-1] != in_channels:
        raise ValueError(
            f"{model} expects {in_channels} input channel(s), got {x.shape[-1]} (shape {tuple(x.shape)})"
        )


def _check_size(model: "Any", h: int, w: int) -> None:
    if model.spatial_sizes(h)[-1] < 1 or model.spatial_sizes(w)[-1] < 1:
        m = model.min_input_size()
        raise ValueError(
            f"{model.model_name} needs inputs of at least {m}x{m} pixels, got {h}x{w} "
            f"(smaller inputs collapse to an empty feature map)"
        )


def se_width(channels: int, se_ratio: float) -> int:
    """Bottleneck channels of squeeze-and-excitation on a C-channel block: floor(C * se_ratio)."""
    return int(math.floor(channels * se_ratio + 1e-9))  # 1e-9: 8 * (1/8) is one channel, not 0.999...


def check_se_ratio(se_ratio: Any, filters: Sequence[int], model: str) -> None:
    """0 (off), or a ratio in (0, 1] that leaves every block's bottleneck at least one channel wide
    (UserError, one line naming the smallest valid value)."""
    if isinstance(se_ratio, (int, float)) and not isinstance(se_ratio, bool) and se_ratio == 0:
        return
    c = min(filters)
    valid = f"use 0 (off) or a value from {1 / c:g} (the smallest for {model}, whose narrowest blocks have {c} " \
            f"channels) to 1"
    if isinstance(se_ratio, bool) or not isinstance(se_ratio, (int, float)) or not math.isfinite(se_ratio):
        raise UserError(f"--se_ratio must be a number, got {se_ratio!r}; {valid}")
    if se_ratio < 0:
        raise UserError(f"--se_ratio={se_ratio:g} is negative; {valid}")
    if se_ratio > 1:
        raise UserError(f"--se_ratio={se_ratio:g} is above 1 (a bottleneck wider than its block); {valid}")
    if se_width(c, se_ratio) < 1:
        raise UserError(f"--se_ratio={se_ratio:g} gives {model}'s {c}-channel blocks a zero-width "
                        f"squeeze-and-excitation bottleneck (floor({c} x {se_ratio:g}) = 0); the smallest valid "
                        f"value is {1 / c:g} (0 turns it off)")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018):

        s = mean over H, W of x                         # squeeze: (B, C)
        g = sigmoid(relu(s @ W1 + b1) @ W2 + b2)        # excitation: W1 (C, width), W2 (width, C)
        y = x * g                                       # a per-channel gate in (0, 1)

    Parameters: 2 * C * width + width + C (two Dense layers; glorot_uniform kernels, zero biases,
    as Keras' Dense). The gate is computed in float32 whatever the compute dtype.
    """

    width: int

    @nn.compact
    def gate(self, x: Array) -> Array:
        c = x.shape[-1]
        w1 = self.param("reduce_kernel", layers.glorot_uniform, (c, self.width))
        b1 = self.param("reduce_bias", nn.initializers.zeros, (self.width,))
        w2 = self.param("expand_kernel", layers.glorot_uniform, (self.width, c))
        b2 = self.param("expand_bias", nn.initializers.zeros, (c,))
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        z = nn.relu(jnp.dot(s, w1, precision=lax.Precision.HIGHEST) + b1)
        return nn.sigmoid(jnp.dot(z, w2, precision=lax.Precision.HIGHEST) + b2)

    def __call__(self, x: Array) -> Array:
        return x * self.gate(x)[:, None, None, :].astype(x.dtype)


class _Zoo(nn.Module):
    """Shared fields and helpers of the zoo's models: the convolution and the head are injected."""

    num_classes: int = 2
    filters: Sequence[int] = (8, 16, 32)
    conv: ConvFactory = layers.Conv2D
    head: Callable[..., nn.Module] = DenseHead
    in_channels: Optional[int] = None
    dtype: Optional[Any] = None
    bn_axis_name: Optional[str] = None
    dropout: float = 0.0
    se_ratio: float = 0.0  # squeeze-and-excitation bottleneck ratio; 0: off (the published models)
    model_name: str = "model"

    def __post_init__(self):
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_se_ratio(self.se_ratio, self.filters, self.model_name)
        super().__post_init__()

    def excite(self, x: Array, name: str) -> Array:
        """Squeeze-and-excitation on a block's output when se_ratio > 0, else x unchanged."""
        if not self.se_ratio:
            return x
        return SqueezeExcite(se_width(x.shape[-1], self.se_ratio), name=name)(x)

    def conv_layer(self, features, kernel, padding, activation=None, name=None):
        return self.conv(features, kernel, padding=padding, activation=activation, dtype=self.dtype, name=name)

    def bn(self, train: bool, name=None, relu: bool = False):
        return layers.BatchNorm(train, axis_name=self.bn_axis_name, dtype=self.dtype, name=name, relu=relu)

    def min_input_size(self) -> int:
        for size in range(1, 4097):
            if self.spatial_sizes(size)[-1] >= 1:
                return size
        raise ValueError(f"{self.model_name}: no input size up to 4096 works")

    def classify(self, x: Array, train: bool) -> Array:
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # GlobalAveragePooling2D
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return self.head(self.num_classes, name="head")(x)


class PlainNet(_Zoo):
    """Blocks of ``convs_per_block`` convolutions, then MaxPool 2x2.

    order='conv_bn_relu': Conv -> BatchNorm -> ReLU (the paper's MNIST models).
    order='conv_relu_bn': Conv(relu) -> BatchNorm (the study's X-ray Conv2D).
    se_ratio > 0: squeeze-and-excitation on each block's output, before its MaxPool.
    """

    convs_per_block: int = 2
    padding: str = "SAME"
    order: str = "conv_bn_relu"

    def spatial_sizes(self, size: int) -> Tuple[int, ...]:
        sizes = [size]
        for _ in self.filters:
            for _ in range(self.convs_per_block):
                size = layers.conv_output_size(size, 3, 1, self.padding) if size > 0 else 0
                sizes.append(size)
            size = size // 2
            sizes.append(size)
        return tuple(sizes)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_image(x, self.model_name, self.in_channels)
        _check_size(self, x.shape[1], x.shape[2])
        for b, f in enumerate(self.filters):
            for i in range(self.convs_per_block):
                name = f"block{b + 1}_conv{i + 1}"
                if self.order == "conv_relu_bn":
                    x = self.conv_layer(f, 3, self.padding, activation=nn.relu, name=name)(x)
                    x = self.bn(train, name=f"block{b + 1}_bn{i + 1}")(x)
                else:
                    x = self.conv_layer(f, 3, self.padding, name=name)(x)
                    x = self.bn(train, name=f"block{b + 1}_bn{i + 1}", relu=True)(x)
            x = self.excite(x, name=f"block{b + 1}_se")  # no residual path: on the block's output, before pooling
            x = layers.max_pool_2x2(x)
        return self.classify(x, train)


class ResidualNet(_Zoo):
    """The study's residual LightLayers block (and the paper's CIFAR models).

        a = conv3x3(x) -> BN -> ReLU -> conv3x3 -> BN
        s = conv1x1(x) -> BN
        x = MaxPool2x2(ReLU(a + s))

    se_ratio > 0: a = SqueezeExcite(a) before the addition (SENet's residual placement).
    """

    def spatial_sizes(self, size: int) -> Tuple[int, ...]:
        sizes = [size]
        for _ in self.filters:
            size = size // 2
            sizes.append(size)
        return tuple(sizes)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        _check_image(x, self.model_name, self.in_channels)
        _check_size(self, x.shape[1], x.shape[2])
        for b, f in enumerate(self.filters):
            p = f"block{b + 1}"
            a = self.conv_layer(f, 3, "SAME", name=f"{p}_conv1")(x)
            a = self.bn(train, name=f"{p}_bn1", relu=True)(a)
            a = self.conv_layer(f, 3, "SAME", name=f"{p}_conv2")(a)
            a = self.bn(train, name=f"{p}_bn2")(a)
            a = self.excite(a, name=f"{p}_se")  # SENet: on the residual branch, before the addition
            s = self.conv_layer(f, 1, "SAME", name=f"{p}_shortcut")(x)
            s = self.bn(train, name=f"{p}_bn_shortcut")(s)
            x = layers.max_pool_2x2(nn.relu(a + s))
        return self.classify(x, train)


class LinearHead(nn.Module):
    """Dense(num_classes) on feature vectors (B, D): the transfer-learning head."""

    num_classes: int = 2
    dropout: float = 0.0
    dtype: Optional[Any] = None
    bn_axis_name: Optional[str] = None  # accepted for a uniform interface; no BatchNorm here
    model_name: str = "linear_head"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if x.ndim != 2:
            raise ValueError(f"{self.model_name} expects feature vectors (B, D), got shape {tuple(x.shape)}")
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=layers.glorot_uniform, name="head")(x.astype(jnp.float32))


class BackboneTail(nn.Module):
    """The last blocks of an ImageNet backbone + a Dense head, fed with cached trunk
    activations (transfer learning, stage 2: fine-tune the last N blocks).

    The backbone's BatchNorm layers stay in inference mode (moving statistics
    frozen, scale/offset trainable), as Keras' fine-tuning recipe prescribes;
    params: ``{"backbone": {block: ...}, "head": Dense}`` — the head has the same
    layout as ``linear_head``, so stage 1's head initialises it.
    """

    backbone: str = "efficientnet_lite0"
    first_block: int = 1
    num_classes: int = 2
    dropout: float = 0.0
    dtype: Optional[Any] = None
    bn_axis_name: Optional[str] = None  # the backbone's BatchNorm is frozen: no cross-device statistics
    model_name: str = "backbone_tail"

    def min_input_size(self) -> int:
        return 1  # takes the cached activation as it is (no resizing)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        from lightflax import pretrained

        if x.ndim != 4:
            raise ValueError(f"{self.model_name} expects trunk activations (B, H, W, C), got shape {tuple(x.shape)}")
        kwargs = {"dtype": self.dtype} if self.dtype is not None else {}
        x = pretrained.build(self.backbone, include_top=False, start_block=self.first_block, name="backbone",
                             **kwargs)(x, train=False)
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=layers.glorot_uniform, name="head")(x.astype(jnp.float32))


# ----------------------------------------------------------------------------
# The zoo: constructors built from injected modules, and a name registry on top
# ----------------------------------------------------------------------------


def _rank(k) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return k


_XRAY = dict(filters=(8, 16, 32))
_MNIST = dict(filters=(8, 16, 32), convs_per_block=2, padding="SAME", order="conv_bn_relu")
_CIFAR = dict(filters=(16, 32, 64))
LightHead = functools.partial(layers.LightDense, k=8)  # the reference's LightLayers classifier


def xray_light(k: int, impl: str = "conv", **kwargs) -> nn.Module:
    return ResidualNet(conv=functools.partial(layers.LightConv2D, k=_rank(k), impl=impl), **_XRAY, **kwargs)


def xray_lowrank(k: int, **kwargs) -> nn.Module:
    return ResidualNet(conv=functools.partial(layers.LowRankConv2D, k=_rank(k)), **_XRAY, **kwargs)


def xray_conv2d(impl: str = "conv", **kwargs) -> nn.Module:
    return PlainNet(conv=functools.partial(layers.Conv2D, impl=impl), convs_per_block=3, padding="VALID",
                    order="conv_relu_bn", **_XRAY, **kwargs)


def mnist_conv2d(impl: str = "conv", **kwargs) -> nn.Module:
    return PlainNet(conv=functools.partial(layers.Conv2D, impl=impl), **_MNIST, **kwargs)


def _separable(impl: Optional[str], depthwise_native: bool) -> ConvFactory:
    # --impl=conv: the grouped lax.conv reference for the depthwise part; otherwise the fused taps.
    # depthwise_native: oneDNN's depthwise kernels where active (opt-in: layers.depthwise_conv2d).
    return functools.partial(layers.SeparableConv2D, depthwise_taps=impl != "conv", depthwise_native=depthwise_native)


def mnist_separable(impl: Optional[str] = None, depthwise_native: bool = False, **kwargs) -> nn.Module:
    return PlainNet(conv=_separable(impl, depthwise_native), **_MNIST, **kwargs)


def mnist_light(k: int, impl: str = "conv", **kwargs) -> nn.Module:
    return PlainNet(conv=functools.partial(layers.LightConv2D, k=_rank(k), impl=impl), head=LightHead, **_MNIST,
                    **kwargs)


def cifar_conv2d(impl: str = "conv", **kwargs) -> nn.Module:
    return ResidualNet(conv=functools.partial(layers.Conv2D, impl=impl), **_CIFAR, **kwargs)


def cifar_separable(impl: Optional[str] = None, depthwise_native: bool = False, **kwargs) -> nn.Module:
    return ResidualNet(conv=_separable(impl, depthwise_native), **_CIFAR, **kwargs)


def cifar_light(k: int, impl: str = "conv", **kwargs) -> nn.Module:
    return ResidualNet(conv=functools.partial(layers.LightConv2D, k=_rank(k), impl=impl), head=LightHead, **_CIFAR,
                       **kwargs)


_ZOO_KWARGS = ("num_classes", "dtype", "bn_axis_name", "dropout", "in_channels", "se_ratio")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model besides its constructor."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: Tuple[int, ...]  # default input (without batch) of the published setting
    num_classes: int
    description: str
    kwargs: Tuple[str, ...]  # keyword arguments create() accepts
    reference_l2: float = 0.0  # the reference's default L2 on LightConv2D kernels (LightLayers models: 1e-4)

    @property
    def needs_k(self) -> bool:
        if not inspect.isfunction(self.factory):
            return False
        p = inspect.signature(self.factory).parameters.get("k")
        return p is not None and p.default is inspect.Parameter.empty


_REGISTRY: Dict[str, ModelInfo] = {}


def register(name: str, factory: Callable[..., nn.Module], *, input_shape, num_classes: int, description: str,
             kwargs: Sequence[str] = _ZOO_KWARGS, reference_l2: float = 0.0) -> None:
    """Adds ``factory`` under ``name``; create() accepts ``kwargs`` plus the factory's own parameters."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    own = tuple(p.name for p in inspect.signature(factory).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) if inspect.isfunction(factory) else ()
    _REGISTRY[name] = ModelInfo(name, factory, tuple(input_shape), num_classes, description,
                                tuple(dict.fromkeys(own + tuple(kwargs))), reference_l2)


def names() -> list:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(names())}")
    return _REGISTRY[name]


def create(name: str, **kwargs) -> nn.Module:
    """Builds a registered model.

    Args:
      name: one of :func:`names`.
      **kwargs: ``num_classes`` (default: the published setting), ``k`` (LightLayers
        and low-rank models only, required there), and optionally ``impl``,
        ``dtype``, ``bn_axis_name``, ``dropout``, ``in_channels``, ``se_ratio``.
    """
    meta = info(name)
    if meta.needs_k and "k" not in kwargs:
        raise ValueError(f"model {name!r} needs k (an integer >= 1)")
    unknown = sorted(set(kwargs) - set(meta.kwargs))
    if unknown:
        raise ValueError(
            f"model {name!r} does not take {', '.join(unknown)}; it takes {', '.join(sorted(meta.kwargs))}"
        )
    kwargs.setdefault("num_classes", meta.num_classes)
    return meta.factory(model_name=name, **kwargs)


for _factory, _shape, _classes, _l2, _text in (
    (xray_light, (299, 299, 3), 2, 1e-4, "LightLayers residual net of the chest X-ray study"),
    (xray_lowrank, (299, 299, 3), 2, 0.0, "xray_light with linear low-rank (LowRankConv2D) kernels"),
    (xray_conv2d, (299, 299, 3), 2, 0.0, "Conv2D net of the chest X-ray study (VALID, no shortcut)"),
    (mnist_conv2d, (28, 28, 1), 10, 0.0, "paper Tables 1-2, Conv2D"),
    (mnist_separable, (28, 28, 1), 10, 0.0, "paper Tables 1-2, SeparableConv2D"),
    (mnist_light, (28, 28, 1), 10, 1e-4, "paper Tables 1-2, LightLayers"),
    (cifar_conv2d, (32, 32, 3), 100, 0.0, "paper Table 4, Conv2D residual"),
    (cifar_separable, (32, 32, 3), 100, 0.0, "paper Table 4, SeparableConv2D residual"),
    (cifar_light, (32, 32, 3), 100, 1e-4, "paper Table 4, LightLayers residual"),
):
    register(_factory.__name__, _factory, input_shape=_shape, num_classes=_classes, description=_text,
             reference_l2=_l2)
register("linear_head", LinearHead, input_shape=(2048,), num_classes=2,
         description="Dense head on cached backbone features (transfer learning)",
         kwargs=("num_classes", "dtype", "bn_axis_name", "dropout"))
register("backbone_tail", BackboneTail, input_shape=(7, 7, 192), num_classes=2,
         description="last N blocks of an ImageNet backbone + Dense head on cached trunk activations "
                     "(transfer learning, fine-tuning stage)",
         kwargs=("backbone", "first_block", "num_classes", "dtype", "bn_axis_name", "dropout"))
