"""Xception in the Keras applications layout, and the mapping of its legacy-HDF5 weights.

Same layers and hyper-parameters as ``keras.applications.Xception``: entry
flow block1 (two 'valid' 3x3 convolutions, 32 and 64 filters, the first with
stride 2), block2..block4 (two separable 3x3 convolutions and a 3x3/2 'same'
max pool, plus a 1x1/2 projection shortcut; every block but block2 starts with
a ReLU), middle flow block5..block12 (three ReLU + separable conv + BN, identity
shortcut), exit flow block13 (like the entry blocks, 728 -> 1024) and block14
(separable 1536 and 2048, each followed by BN and ReLU). No convolution has a
bias; BatchNorm epsilon 1e-3, momentum 0.99; separable = depthwise 3x3 ('same',
TensorFlow padding) then pointwise 1x1. Blocks (stable parameter-path prefixes,
in order): ``block1 .. block14`` (+ ``predictions`` with include_top); for
``--finetune_blocks`` a block is one of these (the middle and exit flow are the
last ten).

The four projection shortcuts are the only layers Keras does not name: they
are ``conv2d[_N]`` / ``batch_normalization[_N]`` in the files, renumbered 1..4
by creation order (block2, block3, block4, block13) when read.

Input: (N, H, W, 3) float32, ``x / 127.5 - 1`` on 0..255 pixels (Keras' 'tf'
mode), H, W >= 71 (Keras' minimum; 299 for the ImageNet weights). Output:
(N, 2048) pooled features, or (N, num_classes) logits with include_top.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax.numpy as jnp
from flax import linen as nn

from lightflax.pretrained import keras_h5
from lightflax.pretrained.backbone import BlockStack, Path
from lightflax.pretrained.efficientnet_lite0 import DepthwiseConv

ARCH = "Xception"
FORMAT = "keras_h5"
RESOLUTION = 299
MIN_SIZE = 71  # keras.applications.Xception's min_size
FEATURE_DIM = 2048
OFFSET, SCALE = 127.5, 127.5  # x / 127.5 - 1
BGR = False
DIGEST = "md5"
# md5 exactly as keras/src/applications/xception.py.
WEIGHTS = keras_h5.keras_applications_weights("xception", "xception", "0a58e3b7378bc2990ea3b43d5981f1f6",
                                              "b0042744bf5b25fce3cb969f33bebb97")
AUTO_PREFIXES = ("conv2d", "batch_normalization")

# block -> (separable conv filters, projection shortcut filters or None (identity) or 0 (none),
#           ReLU before the first separable conv, max pool at the end)
SEP_BLOCKS = {
    "block2": ((128, 128), 128, False, True),
    "block3": ((256, 256), 256, True, True),
    "block4": ((728, 728), 728, True, True),
    **{f"block{i}": ((728, 728, 728), None, True, False) for i in range(5, 13)},
    "block13": ((728, 1024), 1024, True, True),
}
SHORTCUT_NUMBER = {b: i for i, b in enumerate(("block2", "block3", "block4", "block13"), start=1)}


def _bn(train: bool, dtype, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, dtype=dtype, name=name)


class SeparableConv(nn.Module):
    """Keras SeparableConv2D(features, 3, padding='same', use_bias=False): depthwise 3x3 then pointwise 1x1."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = DepthwiseConv(3, 1, dtype=self.dtype, name="depthwise")(x)
        return nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="pointwise")(x)


class EntryConvs(nn.Module):
    """block1: 3x3/2 conv (32) -> BN -> ReLU -> 3x3 conv (64) -> BN -> ReLU, 'valid' padding."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j, (features, stride) in enumerate(((32, 2), (64, 1)), start=1):
            x = nn.Conv(features, (3, 3), (stride, stride), padding="VALID", use_bias=False, dtype=self.dtype,
                        name=f"conv{j}")(x)
            x = nn.relu(_bn(train, self.dtype, f"conv{j}_bn")(x))
        return x


class SepBlock(nn.Module):
    """block2..block13: [ReLU] -> sep conv -> BN, repeated, [max pool], + shortcut."""

    filters: Tuple[int, ...]
    shortcut: Optional[int]
    first_relu: bool = True
    pool: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        residual = x
        if self.shortcut:
            residual = nn.Conv(self.shortcut, (1, 1), (2, 2), padding="SAME", use_bias=False, dtype=self.dtype,
                               name="shortcut")(x)
            residual = _bn(train, self.dtype, "shortcut_bn")(residual)
        for j, features in enumerate(self.filters, start=1):
            if j > 1 or self.first_relu:
                x = nn.relu(x)
            x = SeparableConv(features, self.dtype, name=f"sepconv{j}")(x)
            x = _bn(train, self.dtype, f"sepconv{j}_bn")(x)
        if self.pool:
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        return x + residual


class ExitConvs(nn.Module):
    """block14: sep conv (1536) -> BN -> ReLU -> sep conv (2048) -> BN -> ReLU."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j, features in enumerate((1536, 2048), start=1):
            x = SeparableConv(features, self.dtype, name=f"sepconv{j}")(x)
            x = nn.relu(_bn(train, self.dtype, f"sepconv{j}_bn")(x))
        return x


class Xception(BlockStack):
    """Keras-layout Xception: (N, H, W, 3) -> (N, 2048) features or (N, num_classes) logits
    (fields and partial application: backbone.BlockStack)."""

    ARCH, MIN_SIZE = ARCH, MIN_SIZE
    BLOCKS = tuple(f"block{i}" for i in range(1, 15))

    def block(self, j: int) -> nn.Module:
        name = self.BLOCKS[j]
        if name == "block1":
            return EntryConvs(self.dtype, name=name)
        if name == "block14":
            return ExitConvs(self.dtype, name=name)
        filters, shortcut, first_relu, pool = SEP_BLOCKS[name]
        return SepBlock(filters, shortcut, first_relu, pool, self.dtype, name=name)


MODEL = Xception

_KERAS_BN = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}


def file_key(path: Path) -> Tuple[str, str]:
    """Flax path -> (canonical Keras weight key, layout).

    ('params', 'block4', 'sepconv2', 'depthwise', 'kernel') -> 'block4_sepconv2/depthwise_kernel' (k,k,C,1);
    ('params', 'block13', 'shortcut', 'kernel') -> 'conv2d_4/kernel';
    ('batch_stats', 'block1', 'conv1_bn', 'mean') -> 'block1_conv1_bn/moving_mean'.
    """
    block, leaf = path[1], path[-1]
    if block == "predictions":
        return f"predictions/{leaf}", "same"
    part = path[2]
    if part == "shortcut":
        return f"conv2d_{SHORTCUT_NUMBER[block]}/kernel", "same"
    if part == "shortcut_bn":
        return f"batch_normalization_{SHORTCUT_NUMBER[block]}/{_KERAS_BN[leaf]}", "same"
    if part.endswith("_bn"):
        return f"{block}_{part}/{_KERAS_BN[leaf]}", "same"
    if len(path) == 5:  # separable: depthwise / pointwise
        return f"{block}_{part}/{path[3]}_kernel", "hwc1" if path[3] == "depthwise" else "same"
    return f"{block}_{part}/{leaf}", "same"
