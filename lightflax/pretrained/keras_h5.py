"""Reader of Keras legacy HDF5 weight files (Keras 2 ``save_weights('x.h5')`` layout).

Layout: root attribute ``layer_names`` (every layer, model.layers order); one
group per layer with attribute ``weight_names`` (e.g. ``conv2d_1/kernel:0``);
the datasets at ``/<layer>/<weight_name>``. Full-model files keep the same
structure under ``/model_weights``.

Layers auto-named by Keras (``conv2d_7``, ``batch_normalization``) are
renumbered 1..n per prefix by their number, i.e. by creation order, so that
Keras 2 (1-based) and Keras 3 (0-based, first one unsuffixed) files give the
same keys. Named layers (``predictions``) are kept as they are.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Iterable, Tuple

import numpy as np

from lightflax.errors import H5FileError

KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


def keras_applications_weights(folder: str, model: str, md5_top: str,
                               md5_notop: str) -> Dict[bool, Tuple[str, str, str]]:
    """{include_top: (file name, URL, md5)} of a keras.applications weight file pair, named and
    hashed as the Keras source names and hashes them (``<model>_weights_tf_dim_ordering_tf_kernels[_notop].h5``)."""
    out = {}
    for top, md5 in ((True, md5_top), (False, md5_notop)):
        name = f"{model}_weights_tf_dim_ordering_tf_kernels{'' if top else '_notop'}.h5"
        out[top] = (name, f"{KERAS_APPLICATIONS_URL}{folder}/{name}", md5)
    return out


def _decode(values: Iterable) -> list:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def renumber(layer_names: Iterable[str], prefixes: Iterable[str]) -> Dict[str, str]:
    """{file layer name: canonical name}; ``prefix[_N]`` -> ``prefix_<rank by N, 1-based>``.

    >>> renumber(['conv2d', 'conv2d_2', 'conv2d_1', 'mixed0'], ['conv2d'])
    {'conv2d': 'conv2d_1', 'conv2d_1': 'conv2d_2', 'conv2d_2': 'conv2d_3', 'mixed0': 'mixed0'}
    """
    prefixes = tuple(prefixes)
    groups: Dict[str, list] = {p: [] for p in prefixes}
    out = {}
    for name in layer_names:
        m = re.fullmatch(rf"({'|'.join(map(re.escape, prefixes))})(?:_(\d+))?", name) if prefixes else None
        if m:
            groups[m.group(1)].append((int(m.group(2)) if m.group(2) else 0, name))
        else:
            out[name] = name
    for prefix, items in groups.items():
        for rank, (_, name) in enumerate(sorted(items), start=1):
            out[name] = f"{prefix}_{rank}"
    return dict(sorted(out.items()))


def read_weights(path: str | os.PathLike, auto_prefixes: Iterable[str] = ()) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """({canonical 'layer/weight': array}, {canonical key: key as written in the file}).

    ``weight`` is the last component of the weight name without ``:0``
    (kernel, bias, beta, gamma, moving_mean, moving_variance). Raises
    H5FileError (one line) for files h5py cannot open or that lack the layout.
    """
    import h5py

    path = os.fspath(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise H5FileError(f"not a readable HDF5 file ({str(e).splitlines()[0]})") from None
    try:
        with f:
            root = f
            if "layer_names" not in root.attrs and "model_weights" in f:
                root = f["model_weights"]
            if "layer_names" not in root.attrs:
                raise H5FileError("no 'layer_names' attribute: not a Keras legacy HDF5 weight file")
            layer_names = _decode(root.attrs["layer_names"])
            canon = renumber(layer_names, auto_prefixes)
            weights: Dict[str, np.ndarray] = {}
            original: Dict[str, str] = {}
            for layer in layer_names:
                if layer not in root:
                    raise H5FileError(f"layer {layer} is listed in layer_names but has no group")
                group = root[layer]
                for wname in _decode(group.attrs.get("weight_names", [])):
                    short = wname.split("/")[-1].split(":")[0]
                    key = f"{canon[layer]}/{short}"
                    if wname not in group:
                        raise H5FileError(f"weight {layer}/{wname} is listed but missing")
                    weights[key] = np.asarray(group[wname][()])
                    original[key] = f"{layer}/{wname}"
            return weights, original
    except H5FileError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise H5FileError(f"damaged HDF5 file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
