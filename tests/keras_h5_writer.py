"""Test support: writes Keras-2 legacy HDF5 weight files (the layout lightflax.pretrained.keras_h5 reads)."""

import os
from typing import Iterable, Tuple

import numpy as np


def write_weights(path: str | os.PathLike, layers: Iterable[Tuple[str, Iterable[Tuple[str, np.ndarray]]]]) -> None:
    """Writes ``[(layer_name, [(weight_name, array), ...]), ...]`` in the legacy layout.

    ``weight_name`` is written as ``<layer>/<weight>:0``
    (Keras 2 style). Layers with no weights get an empty ``weight_names``.
    """
    import h5py

    with h5py.File(os.fspath(path), "w") as f:
        names = []
        for layer, ws in layers:
            names.append(layer.encode("utf8"))
            g = f.create_group(layer)
            wnames = []
            for w, arr in ws:
                full = f"{layer}/{w}:0"
                g.create_dataset(full, data=arr)
                wnames.append(full.encode("utf8"))
            g.attrs["weight_names"] = np.array(wnames, dtype="S") if wnames else np.array([], dtype="S1")
        f.attrs["layer_names"] = np.array(names, dtype="S")
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.1.2"
