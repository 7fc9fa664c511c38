"""What every pretrained backbone shares: the Backbone object, preprocessing,
and an all-or-nothing assembly of the variable tree from a weight file."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lightflax.errors import CheckpointError, DataError

Path = Tuple[str, ...]
Norm = Union[float, Tuple[float, float, float]]  # one value, or one per channel (in the model's channel order)

# Layout of a weight in its file, relative to Flax: (to_flax(array), file_shape(flax_shape)).
LAYOUTS: Dict[str, Tuple[Callable[[np.ndarray], np.ndarray], Callable[[tuple], tuple]]] = {
    "same": (lambda a: a, lambda s: tuple(s)),
    # PyTorch conv OIHW -> Flax HWIO (also depthwise (C,1,k,k) -> (k,k,1,C)).
    "oihw": (lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1])),
    # PyTorch Linear (out, in) -> Flax Dense (in, out).
    "linear": (lambda a: a.T, lambda s: (s[1], s[0])),
    # Keras depthwise kernel (k, k, C, 1) -> Flax grouped-conv kernel (k, k, 1, C).
    "hwc1": (lambda a: a.transpose(0, 1, 3, 2), lambda s: (s[0], s[1], s[3], s[2])),
}


def flatten(tree: Mapping) -> Dict[Path, Any]:
    """{('params', 'block', 'conv', 'kernel'): leaf} in insertion order."""
    out: Dict[Path, Any] = {}

    def rec(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(v, prefix + (str(k),))
        else:
            out[prefix] = node

    rec(tree, ())
    return out


def unflatten(flat: Mapping[Path, Any]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


def abstract_variables_and_order(module: nn.Module, resolution: int) -> Tuple[Dict[str, Any], list]:
    """(abstract variables, their paths in model order).

    Model order: module by module as created, params before batch_stats
    (jax.eval_shape returns dicts with sorted keys, so the order is captured
    inside the trace).
    """
    variables, order = _abstract_and_order(module, resolution)
    first_seen: Dict[Path, int] = {}
    for p in order:
        first_seen.setdefault(p[1:-1], len(first_seen))
    index = {p: i for i, p in enumerate(order)}
    return variables, sorted(order, key=lambda p: (first_seen[p[1:-1]], p[0] != "params", index[p]))


def _abstract_and_order(module: nn.Module, resolution: int):
    order: list = []

    def init(k, x):
        v = module.init(k, x, train=False)
        order.extend(flatten(v).keys())
        return v

    x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    return jax.eval_shape(init, jax.random.key(0), x), order


def assemble(expected: Mapping, weights: Mapping[str, np.ndarray],
             file_key: Callable[[Path], Tuple[str, str]], *, filename: str, arch: str,
             ignorable: Callable[[str], bool] = lambda k: False,
             display: Optional[Mapping[str, str]] = None,
             order: Optional[Sequence[Path]] = None) -> Dict[str, Any]:
    """Builds the whole variable tree from ``weights`` or raises CheckpointError.

    expected: the abstract variable tree (ShapeDtypeStructs). file_key(path)
    gives (key in ``weights``, layout name in LAYOUTS). Every expected leaf must
    be present with the right shape, and every file entry must be used (or be
    ``ignorable``); the first problem, in model order, is reported in one line
    naming the file, the weight, the expected and the found shape. Nothing is
    returned until everything has been checked. ``order``: the model order of
    the paths (see creation_order), so that "first" means first in the model.
    """
    display = display or {}
    out: Dict[Path, np.ndarray] = {}
    used = set()
    leaves = flatten(expected)
    rank = {p: i for i, p in enumerate(order or ())}
    for path, leaf in sorted(leaves.items(), key=lambda kv: rank.get(kv[0], len(rank))):
        key, layout = file_key(path)
        to_flax, file_shape = LAYOUTS[layout]
        want = file_shape(tuple(leaf.shape))
        if key not in weights:
            raise CheckpointError(
                f"{filename}: weight {display.get(key, key)} (expected shape {want}) is missing — "
                f"not {arch} weights (or truncated; {_first_names(weights, display)}); pass the right file")
        arr = weights[key]
        if tuple(arr.shape) != want:
            raise CheckpointError(
                f"{filename}: weight {display.get(key, key)}: expected shape {want}, found "
                f"{tuple(arr.shape)} — not {arch} weights; pass the right file")
        if not np.issubdtype(arr.dtype, np.floating):
            raise CheckpointError(f"{filename}: weight {display.get(key, key)} has dtype {arr.dtype}, "
                                  "expected floating point — damaged or foreign file")
        out[path] = np.ascontiguousarray(to_flax(np.asarray(arr)), dtype=np.float32)
        used.add(key)
    extra = [k for k in weights if k not in used and not ignorable(k)]
    if extra:
        k = extra[0]
        raise CheckpointError(
            f"{filename}: unexpected weight {display.get(k, k)} with shape {tuple(weights[k].shape)} "
            f"({len(extra)} unused in all) — not {arch} weights; pass the right file")
    return unflatten(out)


def _first_names(weights: Mapping[str, Any], display: Mapping[str, str], n: int = 3) -> str:
    """'found: a, b, c, ... (N in all)': the first weight names of a file, for error messages."""
    if not weights:
        return "the file holds no weights"
    names = [display.get(k, k) for k in list(weights)[:n]]
    more = ", ..." if len(weights) > n else ""
    return f"found: {', '.join(names)}{more} ({len(weights)} in all)"


def weights_sha256(variables: Mapping) -> str:
    """sha256 over every (path, dtype, shape, bytes) of a variable tree, in path order."""
    h = hashlib.sha256()
    for path, leaf in sorted(flatten(variables).items()):
        a = np.asarray(leaf)
        h.update("/".join(path).encode())
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@functools.partial(jax.jit, static_argnames=("resolution", "offset", "scale", "bgr"))
def preprocess_images(images: jax.Array, *, resolution: int, offset: Norm, scale: Norm,
                      bgr: bool = False) -> jax.Array:
    """(N, H, W, C in {1, 3}) pixels 0..255 -> (N, r, r, 3) float32 ``(x - offset) / scale``.

    Bilinear resize (anti-aliased when shrinking); grey images are replicated
    to RGB; ``bgr``: channels reversed first (Keras' 'caffe' mode). ``offset`` and
    ``scale`` are one value or one per channel, in the model's channel order.
    """
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (resolution, resolution):
        x = jax.image.resize(x, (x.shape[0], resolution, resolution, 3), "bilinear", antialias=True)
    if bgr:
        x = x[..., ::-1]
    return (x - jnp.asarray(offset, jnp.float32)) / jnp.asarray(scale, jnp.float32)


def check_input_size(x, minimum: int, arch: str) -> None:
    """One-line ValueError when the (N, H, W, C) input is smaller than the backbone's minimum."""
    if x.ndim != 4 or min(x.shape[1:3]) < minimum:
        raise ValueError(f"{arch} takes (N, H, W, 3) inputs of at least {minimum}x{minimum}, got shape "
                         f"{tuple(x.shape)}; resize the images to {minimum} px or more")


def check_block_range(blocks: Sequence[str], start: int, stop: Optional[int]) -> int:
    """Validates a partial-application range over ``blocks``; returns the stop index."""
    n = len(blocks)
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise ValueError(f"block range must satisfy 0 <= start_block < stop_block <= {n}, "
                         f"got start_block={start}, stop_block={stop}")
    return stop


def check_images(images) -> None:
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] not in (1, 3):
        raise DataError(f"images must be uint8 NHWC with 1 or 3 channels, got shape {shape}; "
                        "pass an (N, H, W, C) array")


class BlockStack(nn.Module):
    """Base of a backbone made of named blocks (``BLOCKS``, the parameter-path prefixes, input to
    output): the blocks, global average pooling, and a Dense classifier named ``CLASSIFIER`` with
    include_top. Subclasses set ARCH, MIN_SIZE, BLOCKS, CLASSIFIER and ``block(j)`` (block j's module).

    Partial application (fine-tuning with a cached trunk): BLOCKS[start_block:stop_block] only;
    with stop_block < len(BLOCKS) the block's raw activation is returned (no pooling). The input
    size is checked (one-line ValueError below MIN_SIZE) when the stack starts at the image.
    """

    include_top: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32
    start_block: int = 0
    stop_block: Optional[int] = None

    ARCH = ""
    MIN_SIZE = 1
    BLOCKS = ()  # class attributes, not dataclass fields
    CLASSIFIER = "predictions"

    def block(self, j: int) -> nn.Module:
        raise NotImplementedError

    @nn.compact
    def __call__(self, x, train: bool = False):
        stop = check_block_range(self.BLOCKS, self.start_block, self.stop_block)
        if self.start_block == 0:
            check_input_size(x, self.MIN_SIZE, self.ARCH)
        for j in range(self.start_block, stop):
            x = self.block(j)(x, train)
        if stop < len(self.BLOCKS):
            return x
        x = jnp.mean(x, axis=(1, 2))
        if not self.include_top:
            return x
        return nn.Dense(self.num_classes, dtype=self.dtype, name=self.CLASSIFIER)(x)


@dataclasses.dataclass(eq=False)
class Backbone:
    """A loaded backbone: module, variables, its preprocessing and a jitted forward.

    preprocess(images uint8 (N,H,W,C)) -> float32 (N, r, r, 3) normalised as the
    weights expect; apply(x (N, r, r, 3)) -> (N, feature_dim) pooled features,
    or (N, 1000) ImageNet logits when include_top.
    """

    name: str
    module: nn.Module
    variables: Dict[str, Any]
    resolution: int
    feature_dim: int
    include_top: bool
    offset: Norm
    scale: Norm
    weights_path: Optional[str] = None
    bgr: bool = False  # channels reversed before normalising (Keras 'caffe' preprocessing)

    def preprocess(self, images) -> jax.Array:
        check_images(images)
        return preprocess_images(jnp.asarray(images), resolution=self.resolution,
                                 offset=self.offset, scale=self.scale, bgr=self.bgr)

    @functools.cached_property
    def _apply_jit(self):
        module = self.module
        return jax.jit(lambda v, x: module.apply(v, x, train=False))

    @functools.cached_property
    def features_from_pixels(self) -> Callable:
        """jitted (variables, uint8 (N,H,W,C)) -> apply(preprocess(images)), in one program."""
        module, r, off, sc, bgr = self.module, self.resolution, self.offset, self.scale, self.bgr

        def fn(variables, images):
            x = preprocess_images(images, resolution=r, offset=off, scale=sc, bgr=bgr)
            return module.apply(variables, x, train=False)

        return jax.jit(fn)

    def apply(self, x) -> jax.Array:
        return self._apply_jit(self.variables, jnp.asarray(x, jnp.float32))

    @functools.cached_property
    def weights_sha256(self) -> str:
        return weights_sha256(self.variables)

    def block_names(self) -> Sequence[str]:
        return list(getattr(self.module, "BLOCKS"))

    @functools.cached_property
    def output_shape(self) -> Tuple[int, ...]:
        """Shape of one example's output: (feature_dim,), or (h, w, c) for a trunk."""
        if getattr(self.module, "stop_block", None) is None:
            return (self.feature_dim,)
        x = jax.ShapeDtypeStruct((1, self.resolution, self.resolution, 3), jnp.float32)
        return tuple(jax.eval_shape(lambda v, x: self.module.apply(v, x, train=False), self.variables, x).shape[1:])

    def trunk(self, stop_block: int) -> "Backbone":
        """The frozen part before block ``stop_block``: pixels -> that block's input activation
        (for fine-tuning the last blocks on cached trunk activations)."""
        blocks = self.block_names()
        if not 0 < stop_block < len(blocks):
            raise ValueError(f"stop_block must be in 1..{len(blocks) - 1} for {self.name}, got {stop_block}")
        return dataclasses.replace(self, module=self.module.clone(stop_block=stop_block, include_top=False),
                                   include_top=False)
