"""Datasets as the study and the paper use them, one way to name them.

    data = lightflax.data.load("chest_xray", manual_dir=...)  # Kaggle/Mendeley JPEG folders
    data = lightflax.data.load("pneumonia_mnist")             # embedded real train/val copy, or a MedMNIST npz
    data = lightflax.data.load("fashion_mnist")               # Debian's IDX files
    data = lightflax.data.load("synthetic", synthetic_shape=(64, 64, 1), num_classes=2)

Every loader returns :class:`DatasetSplits`: uint8 NHWC images and int32 labels per
split ('train', 'val', 'test'; None when a dataset has no such split, e.g. the
embedded PneumoniaMNIST copy has no test split), plus provenance and notes. File
datasets are TFDS builders (GeneratorBasedBuilder -> array_record -> read back with
``tfds.data_source``) that need no TensorFlow; they are prepared once under
``<cache>/tfds/`` and reused. Resizing to the model's resolution, gray->RGB,
scaling and mean subtraction happen on device (:mod:`lightflax.data.pipeline`).

Where data is looked for: ``--data_dir``/``--manual_dir``; env ``LIGHTFLAX_DATA_DIR``
(else ``$XDG_CACHE_HOME/lightflax/data``, default ``~/.cache/lightflax/data``); for
pneumonia_mnist at 28x28 the copy embedded in the package (``lightflax/data/embedded``,
sha256-checked); for fashion_mnist
``/usr/share/datasets/fashion-mnist``. A missing dataset raises
:class:`lightflax.errors.DataError` with one line saying where it looked and how
to get the data; :func:`available` checks without raising or downloading.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from lightflax.data.types import DatasetSplits, Split
from lightflax.errors import DataError

__all__ = ["DATASETS", "DatasetSplits", "Split", "load", "available"]

DATASETS = ("chest_xray", "pneumonia_mnist", "fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic")


def load(name: str, *, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
         stored_size: Optional[int] = None, synthetic_shape: Optional[Sequence[int]] = None,
         synthetic_sizes: Optional[Dict[str, int]] = None, num_classes: Optional[int] = None, seed: int = 0,
         on_corrupt: str = "skip", download: bool = True, holdout: bool = True) -> DatasetSplits:
    """Loads a dataset by its ``--dataset`` name.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: chest_xray: where prepared files go (default the cache); pneumonia_mnist:
        the npz file or its folder; mnist/fashion_mnist: the folder of IDX .gz files;
        cifar: the TFDS data_dir.
      manual_dir: chest_xray only: the folder holding ``chest_xray/`` or ``chest_xray/`` itself.
      stored_size: the resolution the images are stored at (the model's input size is
        ``RunConfig.image_size``, reached by resizing on device). chest_xray: the builder
        config (299, 224, 128, 64; default 299); pneumonia_mnist: the MedMNIST+ size
        (28, 64, 128, 224; default 28 or whatever ``data_dir`` names). Ignored by the others.
      synthetic_shape, synthetic_sizes, num_classes, seed: synthetic only ((H, W, C),
        {split: n}, classes, RNG seed).
      on_corrupt: chest_xray: 'skip' (reported in notes and the log) or 'fail'.
      download: allow downloading missing pneumonia_mnist / mnist / fashion_mnist files
        (only when no ``data_dir`` was given).
      holdout: mnist/fashion_mnist/cifar: split a fixed 5,000-image validation hold-out off
        the official training set (default); False keeps the whole training set in its
        original order and has no val split (the LightLayers paper's protocol).
    Returns:
      DatasetSplits; images uint8 (N, H, W, C), labels int32 (N,).
    """
    if name not in DATASETS:
        raise DataError(f"unknown --dataset {name!r}; use one of {', '.join(DATASETS)}")
    if name == "synthetic":
        from lightflax.data import synthetic

        return synthetic.load(shape=tuple(synthetic_shape or (28, 28, 1)), num_classes=num_classes or 2,
                              sizes=synthetic_sizes, seed=seed)
    if name == "chest_xray":
        from lightflax.data import chest_xray

        return chest_xray.load(manual_dir=manual_dir, data_dir=data_dir, resolution=stored_size or 299,
                               on_corrupt=on_corrupt)
    if name == "pneumonia_mnist":
        from lightflax.data import pneumonia_mnist

        return pneumonia_mnist.load(data_dir, size=stored_size, download_ok=download)
    if name in ("mnist", "fashion_mnist"):
        from lightflax.data import mnist

        return mnist.load(name, data_dir, download_ok=download, holdout=holdout)
    from lightflax.data import catalog

    return catalog.load(name, data_dir, holdout=holdout)


def available(name: str, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
              stored_size: Optional[int] = None) -> bool:
    """Whether :func:`load` would find local data for ``name`` (no download, no raise)."""
    if name == "synthetic":
        return True
    if name == "chest_xray":
        from lightflax.data.chest_xray import find_root

        return find_root(manual_dir)[0] is not None
    if name == "pneumonia_mnist":
        from lightflax.data import pneumonia_mnist

        return pneumonia_mnist.find(data_dir, stored_size)[0] is not None
    if name in ("mnist", "fashion_mnist"):
        from lightflax.data import mnist

        return mnist.find(name, data_dir)[0] is not None
    if name in ("cifar10", "cifar100"):
        from lightflax.data import catalog

        return catalog.tensorflow_available()
    return False
