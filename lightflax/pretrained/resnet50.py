"""ResNet50 in the Keras applications layout, and the mapping of its legacy-HDF5 weights.

Same layers and hyper-parameters as ``keras.applications.ResNet50`` (keras'
``resnet.py``, ResNet v1): every convolution has a bias; BatchNorm epsilon
1.001e-5, momentum 0.99; stem = zero-pad 3, 7x7/2 conv, BN, ReLU, zero-pad 1,
3x3/2 max pool; then 3 + 4 + 6 + 3 bottleneck units whose stride sits on the
first 1x1 convolution (the Caffe/Keras v1 placement), the first unit of each
stage with a 1x1 projection shortcut. Blocks (stable parameter-path prefixes,
in order): ``stem, conv2_block1 .. conv5_block3`` (+ ``predictions`` with
include_top); a block is one residual unit, so ``--finetune_blocks=N`` tunes the
last N units.

Input: (N, H, W, 3) float32 in Keras' 'caffe' mode: channels in BGR order, the
ImageNet BGR means (103.939, 116.779, 123.68) subtracted, no scaling; H, W >= 32
(Keras' own minimum; 224 for the ImageNet weights). Output: (N, 2048) pooled
features, or (N, num_classes) logits with include_top.

The ``Bottleneck`` unit here is shared with SE-ResNet50 (se_resnet50.py), which
differs by its squeeze-and-excitation branch, bias-free convolutions and epsilon.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax.numpy as jnp
from flax import linen as nn

from lightflax.pretrained import keras_h5
from lightflax.pretrained.backbone import BlockStack, Path

ARCH = "ResNet50"
FORMAT = "keras_h5"
RESOLUTION = 224
MIN_SIZE = 32  # keras.applications.ResNet50's min_size
FEATURE_DIM = 2048
OFFSET = (103.939, 116.779, 123.68)  # keras imagenet_utils 'caffe' mode, BGR order
SCALE = 1.0
BGR = True
DIGEST = "md5"
# md5 exactly as keras/src/applications/resnet.py (WEIGHTS_HASHES["resnet50"]).
WEIGHTS = keras_h5.keras_applications_weights("resnet", "resnet50", "2cb95161c43110f7111970584f804107",
                                              "4d473c1dd8becc155b73f8504c6f6626")
AUTO_PREFIXES: Tuple[str, ...] = ()  # every ResNet50 layer is named

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (bottleneck width, units, first stride)
UNITS = tuple((f"conv{s + 2}_block{u + 1}", width, stride if u == 0 else 1)
              for s, (width, n, stride) in enumerate(STAGES) for u in range(n))


class Bottleneck(nn.Module):
    """1x1 (stride) -> 3x3 -> 1x1 (x4), BN after each, ReLU after the first two;
    [squeeze-and-excitation on the residual branch]; + shortcut (1x1 projection in
    the first unit of a stage); ReLU."""

    width: int
    stride: int = 1
    project: bool = False
    use_bias: bool = True
    epsilon: float = 1.001e-5
    momentum: float = 0.99
    se_reduction: Optional[int] = None
    dtype: Any = jnp.float32

    def conv_bn(self, x, features: int, kernel: int, stride: int, name: str, train: bool):
        pad = ((kernel // 2, kernel // 2),) * 2
        x = nn.Conv(features, (kernel, kernel), (stride, stride), padding=pad, use_bias=self.use_bias,
                    dtype=self.dtype, name=f"{name}_conv")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon,
                            dtype=self.dtype, name=f"{name}_bn")(x)

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = 4 * self.width
        shortcut = self.conv_bn(x, out, 1, self.stride, "shortcut", train) if self.project else x
        y = nn.relu(self.conv_bn(x, self.width, 1, self.stride, "conv1", train))
        y = nn.relu(self.conv_bn(y, self.width, 3, 1, "conv2", train))
        y = self.conv_bn(y, out, 1, 1, "conv3", train)
        if self.se_reduction:
            s = jnp.mean(y, axis=(1, 2), keepdims=True)
            s = nn.relu(nn.Conv(out // self.se_reduction, (1, 1), dtype=self.dtype, name="se_fc1")(s))
            y = y * nn.sigmoid(nn.Conv(out, (1, 1), dtype=self.dtype, name="se_fc2")(s))
        return nn.relu(y + shortcut)


class Stem(nn.Module):
    """Zero-pad 3, 7x7/2 conv (bias), BN, ReLU, zero-pad 1, 3x3/2 max pool (Keras' conv1 + pool1)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1.001e-5, dtype=self.dtype,
                         name="bn")(x)
        x = jnp.pad(nn.relu(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
        return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class ResNet50(BlockStack):
    """Keras-layout ResNet50: (N, H, W, 3) -> (N, 2048) features or (N, num_classes) logits
    (fields and partial application: backbone.BlockStack)."""

    ARCH, MIN_SIZE = ARCH, MIN_SIZE
    BLOCKS = ("stem",) + tuple(name for name, *_ in UNITS)

    def block(self, j: int) -> nn.Module:
        if j == 0:
            return Stem(self.dtype, name="stem")
        name, width, stride = UNITS[j - 1]
        return Bottleneck(width, stride, name.endswith("_block1"), dtype=self.dtype, name=name)


MODEL = ResNet50

_KERAS_BN = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
_KERAS_UNIT = {"shortcut": "0", "conv1": "1", "conv2": "2", "conv3": "3"}


def file_key(path: Path) -> Tuple[str, str]:
    """Flax path -> (Keras weight key, layout).

    ('params', 'conv3_block1', 'shortcut_conv', 'kernel') -> 'conv3_block1_0_conv/kernel';
    ('batch_stats', 'stem', 'bn', 'var') -> 'conv1_bn/moving_variance';
    ('params', 'predictions', 'bias') -> 'predictions/bias'.
    """
    block, leaf = path[1], path[-1]
    if block == "predictions":
        return f"predictions/{leaf}", "same"
    if block == "stem":
        layer = f"conv1_{path[2]}"
    else:
        part, kind = path[2].rsplit("_", 1)
        layer = f"{block}_{_KERAS_UNIT[part]}_{kind}"
    return f"{layer}/{_KERAS_BN.get(leaf, leaf) if layer.endswith('_bn') else leaf}", "same"
