"""PneumoniaMNIST (MedMNIST v2 / MedMNIST+) from its npz files, as a TFDS builder.

Sources, in order: ``--data_dir`` (the npz file or the folder holding it);
``$LIGHTFLAX_DATA_DIR`` or the cache (``.../pneumonia_mnist/``); the project's shared
folder (``<shared>/data/pneumoniamnist/``, train and val only); else, when online,
the official MedMNIST+ record on Zenodo, checked against the MD5 the ``medmnist``
package lists. Labels: 0 = normal, 1 = pneumonia.

A file without a test split (the shared ``pneumoniamnist_trainval.npz``) gives
``splits['test'] = None`` and a note: train on train, select on val, report test
as null - never test figures computed on val.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from lightflax.data import locations, tfds_util
from lightflax.data.types import DatasetSplits, Split
from lightflax.errors import DataError

CLASSES = ("normal", "pneumonia")
SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
ZENODO = "https://zenodo.org/records/10519652/files/"
# MD5s as listed by the medmnist package (medmnist/info.py, MedMNIST+ record 10519652).
MD5 = {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
       128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"}
HOW_TO_GET = (f"pass --data_dir=FILE.npz or a folder holding it (MedMNIST+: {ZENODO}pneumoniamnist.npz), "
              f"set LIGHTFLAX_SHARED_DIR to the folder holding data/pneumoniamnist/, "
              f"or use --dataset=synthetic for a smoke run")


def file_name(size: int) -> str:
    return "pneumoniamnist.npz" if size == 28 else f"pneumoniamnist_{size}.npz"


def candidates(folder: Path, size: Optional[int]) -> List[Path]:
    """File names that may hold ``size`` (None: any size) in ``folder``."""
    sizes = SIZES if size is None else (size,)
    names = [file_name(s) for s in sizes]
    if size in (None, 28):
        names.append("pneumoniamnist_trainval.npz")
    return [folder / n for n in names]


def default_dirs() -> List[Path]:
    return [locations.cache_root() / "pneumonia_mnist", locations.shared_dir() / "data" / "pneumoniamnist"]


def find(data_dir: Optional[str], size: Optional[int]) -> Tuple[Optional[Path], List[str]]:
    """The npz file to use and where it looked."""
    if data_dir:
        p = Path(data_dir).expanduser()
        if p.is_file():
            return p, [str(p)]
        folders = [p]
    else:
        folders = default_dirs()
    for folder in folders:
        for c in candidates(folder, size):
            if c.is_file():
                return c, [str(f) for f in folders]
    return None, [str(f) for f in folders]


def download(size: int) -> Path:
    dest = locations.cache_root() / "pneumonia_mnist" / file_name(size)
    return locations.download(f"{ZENODO}{file_name(size)}?download=1", dest, algorithm="md5", digest=MD5[size])


def read_npz(path: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (N, S, S), labels (N,))} for the splits in the file."""
    try:
        with np.load(path) as z:
            keys = set(z.files)
            out = {}
            for s in SPLITS:
                if f"{s}_images" in keys:
                    if f"{s}_labels" not in keys:
                        raise DataError(f"{path} has {s}_images but no {s}_labels: not a PneumoniaMNIST npz")
                    out[s] = (z[f"{s}_images"], np.asarray(z[f"{s}_labels"]).reshape(-1))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a readable npz file ({type(e).__name__}: {e}); re-download it") from None
    if "train" not in out or "val" not in out:
        raise DataError(f"{path} lacks train_images/val_images: not a PneumoniaMNIST npz")
    for s, (images, labels) in out.items():
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise DataError(f"{path}: {s}_images must be uint8 (N, S, S) grayscale, got {images.dtype} "
                            f"{images.shape}")
        if len(labels) != len(images) or (len(labels) and (labels.min() < 0 or labels.max() > 1)):
            raise DataError(f"{path}: {s}_labels must be {len(images)} labels in {{0, 1}}")
    return out


class PneumoniaMnist(tfds.core.GeneratorBasedBuilder):
    """PneumoniaMNIST from a local npz, one config per MedMNIST+ size."""

    name = "lightflax_pneumonia_mnist"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "uint8 tensors from the MedMNIST npz, source order kept."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=str(s), description=f"{s}x{s}") for s in SIZES]
    DEFAULT_CONFIG_NAME = "28"

    def __init__(self, *, source_path: Optional[str] = None, **kwargs):
        self._source_path = source_path
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = int(self.builder_config.name)
        return tfds.core.DatasetInfo(
            builder=self,
            description="PneumoniaMNIST (MedMNIST v2/MedMNIST+), Yang et al. 2023; CC BY 4.0.",
            features=tfds_util.features((s, s, 1), CLASSES),
            supervised_keys=("image", "label"),
            homepage="https://medmnist.com/",
        )

    def _split_generators(self, dl_manager):
        if not self._source_path:
            raise DataError(f"lightflax_pneumonia_mnist needs source_path to prepare; {HOW_TO_GET}")
        arrays = read_npz(Path(self._source_path))
        size = int(self.builder_config.name)
        for s, (images, _) in arrays.items():
            if images.shape[1] != size:
                raise DataError(f"{self._source_path} holds {images.shape[1]}x{images.shape[1]} images, "
                                f"not {size}x{size}; pass the matching --image_size")
        return {s: self._generate_examples(*a) for s, a in arrays.items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator:
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[..., None], "label": int(label), "index": i}


def _overlap(a: np.ndarray, b: np.ndarray) -> int:
    """How many images of ``b`` also occur (byte-identical) in ``a``."""
    seen = {hashlib.sha256(x.tobytes()).digest() for x in a}
    return sum(hashlib.sha256(x.tobytes()).digest() in seen for x in b)


def load(data_dir: Optional[str] = None, size: Optional[int] = None, download_ok: bool = True) -> DatasetSplits:
    """Prepares (once) and loads PneumoniaMNIST; ``size`` None: 28 or whatever ``data_dir`` holds."""
    if size is not None and size not in SIZES:
        raise DataError(f"pneumonia_mnist comes in {', '.join(map(str, SIZES))} pixels, not {size}")
    path, looked = find(data_dir, size)
    if path is None and download_ok and not data_dir:
        path = download(size or 28)  # raises DataError (one line) when offline
    if path is None:
        raise DataError(f"PneumoniaMNIST not found (looked in {', '.join(looked)}); {HOW_TO_GET}")
    if size is None:
        size = int(read_npz(path)["train"][0].shape[1])
        if size not in SIZES:
            raise DataError(f"{path} holds {size}x{size} images; PneumoniaMNIST sizes are {SIZES}")
    target = locations.prepared_dir(None, "pneumonia_mnist", locations.file_fingerprint(path))
    builder = tfds_util.prepare(PneumoniaMnist, data_dir=target, config=str(size), source_path=str(path))
    arrays = tfds_util.read_all(builder, SPLITS)
    splits: Dict[str, Optional[Split]] = {s: None for s in SPLITS}
    for s, (images, labels, _) in arrays.items():
        splits[s] = Split(images, labels)
    notes = []
    if splits["test"] is None:
        notes.append(f"{path.name} has no test split: trained on train, selected on val; test columns are null "
                     f"(never computed on val)")
    dup = _overlap(splits["train"].images, splits["val"].images)
    if dup:
        notes.append(f"{dup} val image(s) also occur byte-identical in train (present in the original data)")
    return DatasetSplits("pneumonia_mnist", False, 2, list(CLASSES), splits, notes=notes, source=str(path))
