"""InceptionV3 in the Keras applications layout, and its legacy-HDF5 weight loader.

Same layers, order and hyper-parameters as ``keras.applications.InceptionV3``:
every convolution has no bias and is followed by BatchNorm(scale=False,
epsilon=1e-3, momentum=0.99) and ReLU; 'same' average pooling excludes the
padding from the mean. Blocks (stable parameter-path prefixes, in order):
``stem, mixed0 .. mixed10`` (+ ``predictions`` with include_top).

Inside a block, conv+BN pair number N (Keras' ``conv2d_N`` /
``batch_normalization_N``, 1-based creation order as in the Keras source) is
the submodule ``conv_bn_N`` with children ``conv`` and ``bn``, so the weight
mapping is by name, not by position.

Input: (N, H, W, 3) float32, ``x / 127.5 - 1`` on 0..255 pixels, H, W >= 75
(299 for the ImageNet weights). Output: (N, 2048) with pooling='avg' or 'max',
(N, h, w, 2048) with pooling=None, (N, num_classes) logits with include_top.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Tuple

import jax.numpy as jnp
from flax import linen as nn

from lightflax.pretrained import keras_h5
from lightflax.pretrained.backbone import Path, check_block_range

ARCH = "InceptionV3"
FORMAT = "keras_h5"
RESOLUTION = 299
MIN_SIZE = 75  # keras.applications.InceptionV3's min_size
FEATURE_DIM = 2048
OFFSET, SCALE = 127.5, 127.5  # x / 127.5 - 1
BGR = False
DIGEST = "md5"

# md5 exactly as keras/src/applications/inception_v3.py.
WEIGHTS = keras_h5.keras_applications_weights("inception_v3", "inception_v3", "9a0d58056eeedaa3f26cb7ebd46da564",
                                              "bcbd6486424b2319ff4ef7d526e38f63")


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm(scale=False, eps 1e-3) -> ReLU, as Keras' conv2d_bn."""

    features: int
    kernel: Tuple[int, int]
    strides: Tuple[int, int] = (1, 1)
    padding: str = "SAME"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, self.kernel, self.strides, padding=self.padding,
                    use_bias=False, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                         use_scale=False, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    """Base: ``first`` is the Keras number of the block's first conv2d."""

    first: int
    dtype: Any = jnp.float32

    def cbn(self, j: int, features: int, kernel, strides=(1, 1), padding="SAME") -> ConvBN:
        return ConvBN(features, tuple(kernel), tuple(strides), padding, self.dtype,
                      name=f"conv_bn_{self.first + j}")


class Stem(_Block):
    """299 -> 35x35x192: three 3x3 convs, max pool, 1x1, 3x3, max pool."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.cbn(0, 32, (3, 3), (2, 2), "VALID")(x, train)
        x = self.cbn(1, 32, (3, 3), padding="VALID")(x, train)
        x = self.cbn(2, 64, (3, 3))(x, train)
        x = _max_pool_valid(x)
        x = self.cbn(3, 80, (1, 1), padding="VALID")(x, train)
        x = self.cbn(4, 192, (3, 3), padding="VALID")(x, train)
        return _max_pool_valid(x)


class InceptionA(_Block):
    """mixed0-2 (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1(pool_features)."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        b1 = self.cbn(0, 64, (1, 1))(x, train)
        b5 = self.cbn(2, 64, (5, 5))(self.cbn(1, 48, (1, 1))(x, train), train)
        bd = self.cbn(3, 64, (1, 1))(x, train)
        bd = self.cbn(5, 96, (3, 3))(self.cbn(4, 96, (3, 3))(bd, train), train)
        bp = self.cbn(6, self.pool_features, (1, 1))(_avg_pool_same(x), train)
        return jnp.concatenate([b1, b5, bd, bp], axis=-1)


class InceptionB(_Block):
    """mixed3 (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        b3 = self.cbn(0, 384, (3, 3), (2, 2), "VALID")(x, train)
        bd = self.cbn(2, 96, (3, 3))(self.cbn(1, 64, (1, 1))(x, train), train)
        bd = self.cbn(3, 96, (3, 3), (2, 2), "VALID")(bd, train)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(_Block):
    """mixed4-7 (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    c7: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        c7 = self.c7
        b1 = self.cbn(0, 192, (1, 1))(x, train)
        b7 = self.cbn(1, c7, (1, 1))(x, train)
        b7 = self.cbn(2, c7, (1, 7))(b7, train)
        b7 = self.cbn(3, 192, (7, 1))(b7, train)
        bd = self.cbn(4, c7, (1, 1))(x, train)
        bd = self.cbn(5, c7, (7, 1))(bd, train)
        bd = self.cbn(6, c7, (1, 7))(bd, train)
        bd = self.cbn(7, c7, (7, 1))(bd, train)
        bd = self.cbn(8, 192, (1, 7))(bd, train)
        bp = self.cbn(9, 192, (1, 1))(_avg_pool_same(x), train)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """mixed8 (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        b3 = self.cbn(0, 192, (1, 1))(x, train)
        b3 = self.cbn(1, 320, (3, 3), (2, 2), "VALID")(b3, train)
        b7 = self.cbn(2, 192, (1, 1))(x, train)
        b7 = self.cbn(3, 192, (1, 7))(b7, train)
        b7 = self.cbn(4, 192, (7, 1))(b7, train)
        b7 = self.cbn(5, 192, (3, 3), (2, 2), "VALID")(b7, train)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(_Block):
    """mixed9-10 (8x8): 1x1 | 1x1-(1x3,3x1) | 1x1-3x3-(1x3,3x1) | avgpool-1x1."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        b1 = self.cbn(0, 320, (1, 1))(x, train)
        b3 = self.cbn(1, 384, (1, 1))(x, train)
        b3 = jnp.concatenate([self.cbn(2, 384, (1, 3))(b3, train),
                              self.cbn(3, 384, (3, 1))(b3, train)], axis=-1)
        bd = self.cbn(4, 448, (1, 1))(x, train)
        bd = self.cbn(5, 384, (3, 3))(bd, train)
        bd = jnp.concatenate([self.cbn(6, 384, (1, 3))(bd, train),
                              self.cbn(7, 384, (3, 1))(bd, train)], axis=-1)
        bp = self.cbn(8, 192, (1, 1))(_avg_pool_same(x), train)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# (block name, class, first conv number, extra attributes) in Keras order.
BLOCK_SPECS = (
    ("stem", Stem, 1, {}),
    ("mixed0", InceptionA, 6, {"pool_features": 32}),
    ("mixed1", InceptionA, 13, {"pool_features": 64}),
    ("mixed2", InceptionA, 20, {"pool_features": 64}),
    ("mixed3", InceptionB, 27, {}),
    ("mixed4", InceptionC, 31, {"c7": 128}),
    ("mixed5", InceptionC, 41, {"c7": 160}),
    ("mixed6", InceptionC, 51, {"c7": 160}),
    ("mixed7", InceptionC, 61, {"c7": 192}),
    ("mixed8", InceptionD, 71, {}),
    ("mixed9", InceptionE, 77, {}),
    ("mixed10", InceptionE, 86, {}),
)
NUM_CONVS = 94


class InceptionV3(nn.Module):
    """Keras-layout InceptionV3: (N, H, W, 3) -> features or logits (see module doc)."""

    include_top: bool = False
    pooling: Optional[str] = "avg"
    num_classes: int = 1000
    dtype: Any = jnp.float32

    # Partial application (fine-tuning with a cached trunk): run BLOCKS[start_block:stop_block]
    # only; with stop_block < len(BLOCKS) the block's raw activation is returned (no pooling).
    start_block: int = 0
    stop_block: Optional[int] = None

    BLOCKS = tuple(name for name, *_ in BLOCK_SPECS)

    @nn.compact
    def __call__(self, x, train: bool = False):
        stop = check_block_range(self.BLOCKS, self.start_block, self.stop_block)
        for name, cls, first, attrs in BLOCK_SPECS[self.start_block:stop]:
            x = cls(first=first, dtype=self.dtype, name=name, **attrs)(x, train)
        if stop < len(self.BLOCKS):
            return x
        if self.include_top:
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(x)
        if self.pooling == "avg":
            return jnp.mean(x, axis=(1, 2))
        if self.pooling == "max":
            return jnp.max(x, axis=(1, 2))
        if self.pooling is None:
            return x
        raise ValueError(f"pooling must be 'avg', 'max' or None, got {self.pooling!r}")


MODEL = InceptionV3

_CONV_BN = re.compile(r"conv_bn_(\d+)")
_BN_NAMES = {"bias": "beta", "scale": "gamma", "mean": "moving_mean", "var": "moving_variance"}


def file_key(path: Path) -> Tuple[str, str]:
    """Flax path -> (canonical Keras-2 weight key, layout).

    ('params', 'mixed0', 'conv_bn_6', 'conv', 'kernel') -> 'conv2d_6/kernel';
    ('batch_stats', 'stem', 'conv_bn_1', 'bn', 'mean') -> 'batch_normalization_1/moving_mean';
    ('params', 'predictions', 'kernel') -> 'predictions/kernel'.
    """
    if path[1] == "predictions":
        return f"predictions/{path[-1]}", "same"
    m = _CONV_BN.fullmatch(path[2])
    if not m:
        raise KeyError(f"unexpected InceptionV3 variable {'/'.join(path)}")
    n = m.group(1)
    if path[3] == "conv":
        return f"conv2d_{n}/{path[-1]}", "same"
    return f"batch_normalization_{n}/{_BN_NAMES[path[-1]]}", "same"


AUTO_PREFIXES = ("conv2d", "batch_normalization")
