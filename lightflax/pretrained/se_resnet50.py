"""SE-ResNet50 (the SENet authors' model, as ported to PyTorch by the ``pretrainedmodels``
package's ``senet.py``), and the mapping of its PyTorch state_dict.

Architecture as ``pretrainedmodels.se_resnet50``: layer0 = 7x7/2 conv (padding
3, no bias), BN, ReLU, 3x3/2 max pool with ``ceil_mode=True``; layer1..layer4 =
3 + 4 + 6 + 3 ``SEResNetBottleneck`` units (stride on the first 1x1 convolution,
as in the Caffe model; no bias; squeeze-and-excitation with reduction 16 on the
residual branch before the addition; 1x1 projection ``downsample`` in each
stage's first unit); BatchNorm epsilon 1e-5 (PyTorch's), momentum 0.1 in
PyTorch terms (0.9 here); average pool, ``last_linear`` 2048 -> 1000. The unit
is resnet50.Bottleneck with SE on. Blocks (stable parameter-path prefixes, in
order): ``layer0, layer1_0 .. layer4_2`` (+ ``last_linear`` with include_top);
a block is one residual unit.

Input: (N, H, W, 3) float32, RGB, ``(x / 255 - mean) / std`` with the ImageNet
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) (pretrainedmodels'
settings), 224x224 for the ImageNet weights. Minimum 195: the original's
``AvgPool2d(7, stride=1)`` needs a final 7x7 map, which with the ceil-mode pool
first happens at 195 (195 -> 98 -> 49 -> 49 -> 25 -> 13 -> 7; 194 ends at 6x6).
The original's classifier takes 195..226 only (above, its pool leaves more than
1x1); this port averages the final map globally, which equals the original on
195..226. Output: (N, 2048) features or (N, num_classes) logits.
"""

from __future__ import annotations

from typing import Any, Tuple

import jax.numpy as jnp
from flax import linen as nn

from lightflax.pretrained.backbone import BlockStack, Path
from lightflax.pretrained.resnet50 import STAGES, Bottleneck

ARCH = "SE-ResNet50"
FORMAT = "torch"
RESOLUTION = 224
MIN_SIZE = 195
FEATURE_DIM = 2048
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OFFSET = tuple(255.0 * m for m in _MEAN)  # (x / 255 - mean) / std == (x - 255 mean) / (255 std)
SCALE = tuple(255.0 * s for s in _STD)
BGR = False
# pretrainedmodels' pretrained_settings['se_resnet50']['imagenet']['url']. The file name carries the
# first 8 hex digits of the file's sha256 (torch.hub's naming); no longer digest is published.
DIGEST = "sha256"
_FILE = "se_resnet50-ce0d4300.pth"
WEIGHTS = {top: (_FILE, "http://data.lip6.fr/cadene/pretrainedmodels/" + _FILE, "ce0d4300") for top in (True, False)}
DOWNLOAD = False  # plain http and an 8-digit digest: the user fetches it

UNITS = tuple((f"layer{s + 1}_{u}", width, stride if u == 0 else 1)
              for s, (width, n, stride) in enumerate(STAGES) for u in range(n))


def _max_pool_ceil(x):
    """MaxPool2d(3, stride=2, ceil_mode=True), no padding: the extra bottom/right window is
    filled with -inf (PyTorch drops a window only when it would start outside the input)."""
    pads = []
    for n in x.shape[1:3]:
        out = -(-(n - 3) // 2) + 1
        pads.append((0, max(0, 2 * (out - 1) + 3 - n)))
    return nn.max_pool(x, (3, 3), (2, 2), padding=tuple(pads))


class Layer0(nn.Module):
    """7x7/2 conv (padding 3, no bias), BN, ReLU, ceil-mode 3x3/2 max pool."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, dtype=self.dtype,
                    name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                         name="bn1")(x)
        return _max_pool_ceil(nn.relu(x))


class SEResNet50(BlockStack):
    """(N, H, W, 3) -> (N, 2048) features, or (N, num_classes) logits with include_top
    (fields and partial application: backbone.BlockStack)."""

    ARCH, MIN_SIZE = ARCH, MIN_SIZE
    BLOCKS = ("layer0",) + tuple(name for name, *_ in UNITS)
    CLASSIFIER = "last_linear"

    def block(self, j: int) -> nn.Module:
        if j == 0:
            return Layer0(self.dtype, name="layer0")
        name, width, stride = UNITS[j - 1]
        return Bottleneck(width, stride, name.endswith("_0"), use_bias=False, epsilon=1e-5, momentum=0.9,
                          se_reduction=16, dtype=self.dtype, name=name)


MODEL = SEResNet50

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def file_key(path: Path) -> Tuple[str, str]:
    """Flax path -> (pretrainedmodels state_dict key, layout).

    ('params', 'layer0', 'conv1', 'kernel') -> 'layer0.conv1.weight' (OIHW);
    ('batch_stats', 'layer2_0', 'shortcut_bn', 'mean') -> 'layer2.0.downsample.1.running_mean';
    ('params', 'layer1_2', 'se_fc1', 'bias') -> 'layer1.2.se_module.fc1.bias';
    ('params', 'last_linear', 'kernel') -> 'last_linear.weight' (transposed).
    """
    block, leaf = path[1], path[-1]
    if block == "last_linear":
        return ("last_linear.weight", "linear") if leaf == "kernel" else ("last_linear.bias", "same")
    if block == "layer0":
        return (f"layer0.{path[2]}.weight", "oihw") if path[2] == "conv1" else (f"layer0.bn1.{_BN[leaf]}", "same")
    prefix = block.replace("_", ".")
    part = path[2]
    if part.startswith("se_"):
        return f"{prefix}.se_module.{part[3:]}.{'weight' if leaf == 'kernel' else 'bias'}", (
            "oihw" if leaf == "kernel" else "same")
    name, kind = part.rsplit("_", 1)
    if name == "shortcut":
        module = "downsample.0" if kind == "conv" else "downsample.1"
    else:
        module = name if kind == "conv" else f"bn{name[-1]}"
    if kind == "conv":
        return f"{prefix}.{module}.weight", "oihw"
    return f"{prefix}.{module}.{_BN[leaf]}", "same"


def is_ignorable_key(key: str, include_top: bool) -> bool:
    """Keys the Flax model does not need: BN step counters, and the classifier without top."""
    return key.endswith(".num_batches_tracked") or (not include_top and key.startswith("last_linear."))
