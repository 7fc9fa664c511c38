"""CIFAR-10/100 (and MNIST) through the TFDS catalog - optional, needs TensorFlow.

The catalog builders download and decode PNG-encoded images, which in
tensorflow-datasets 4.9 needs TensorFlow; lightflax does not depend on it. With
``pip install tensorflow-cpu`` these load as ``tfds.load(name, batch_size=-1)``.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import numpy as np

from lightflax.data.mnist import split_holdout
from lightflax.data.types import DatasetSplits, Split
from lightflax.errors import DataError

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10}


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def load(name: str, data_dir: Optional[str] = None, holdout: bool = True) -> DatasetSplits:
    if name not in NUM_CLASSES:
        raise DataError(f"{name} is not served through the TFDS catalog here; use one of {sorted(NUM_CLASSES)}")
    if not tensorflow_available():
        raise DataError(f"{name} comes through the TFDS catalog, which needs TensorFlow: pip install tensorflow-cpu "
                        f"(or use --dataset=synthetic)")
    import tensorflow_datasets as tfds

    try:
        ds, info = tfds.load(name, data_dir=data_dir, batch_size=-1, as_supervised=True, with_info=True)
        arrays = tfds.as_numpy(ds)
    except Exception as e:  # network, disk, TF errors: one line to the user
        raise DataError(f"could not load {name} from the TFDS catalog ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    splits, note = split_holdout(Split(np.asarray(arrays["train"][0]), np.asarray(arrays["train"][1])), holdout)
    splits["test"] = Split(np.asarray(arrays["test"][0]), np.asarray(arrays["test"][1]))
    names = list(info.features["label"].names)
    return DatasetSplits(name, False, NUM_CLASSES[name], names, splits, notes=[note],
                         source=f"tfds catalog {name} ({info.data_dir})")
