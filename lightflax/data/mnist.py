"""MNIST and Fashion-MNIST from the original IDX .gz files, as TFDS builders.

Sources, in order: ``--data_dir`` (folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``);
``$LIGHTFLAX_DATA_DIR`` or the cache (``.../<name>/``); for Fashion-MNIST Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``); else, when
online, the original URLs, checked against the SHA-256 sums TFDS lists.

Splits: 'test' is the official 10,000-image test set; 'val' is a fixed 5,000-image
hold-out of the official training set (seed ``VAL_SEED``) and 'train' the other 55,000.
(The LightLayers paper selects on its test split; the experiment decides which
split to select on, the data layer only provides them.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from lightflax.data import idx, locations, tfds_util
from lightflax.data.types import DatasetSplits, Split
from lightflax.errors import DataError

NAMES = ("mnist", "fashion_mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = {"mnist": [str(i) for i in range(10)],
           "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                             "Bag", "Ankle boot"]}
SYSTEM_DIRS = {"mnist": [], "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")]}
# URLs and SHA-256 sums as in tensorflow_datasets/url_checksums/{mnist,fashion_mnist}.txt.
URLS = {"mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}
VAL_SIZE = 5000
VAL_SEED = 20210106


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for pair in FILES.values() for f in pair)


def find(name: str, data_dir: Optional[str]) -> Tuple[Optional[Path], List[str]]:
    folders = ([Path(data_dir).expanduser()] if data_dir
               else [locations.cache_root() / name, *SYSTEM_DIRS[name]])
    for folder in folders:
        if _complete(folder):
            return folder, [str(f) for f in folders]
    return None, [str(f) for f in folders]


def download(name: str) -> Path:
    target = locations.cache_root() / name
    for pair in FILES.values():
        for f in pair:
            if not (target / f).is_file():
                locations.download(URLS[name] + f, target / f, algorithm="sha256", digest=SHA256[name][f])
    return target


def read_folder(folder: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (N, 28, 28), labels uint8 (N,))} from the IDX files in ``folder``."""
    out = {}
    for split, (fi, fl) in FILES.items():
        images, labels = idx.read(folder / fi), idx.read(folder / fl)
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{folder}: {fi}/{fl} do not hold uint8 (N, H, W) images and N labels")
        if len(labels) and labels.max() > 9:
            raise DataError(f"{folder / fl} holds label {labels.max()}; MNIST labels are 0..9")
        out[split] = (images, labels)
    return out


class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common part of the two IDX builders (subclasses set ``name`` and ``DATASET``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "uint8 tensors from the original IDX files, source order kept."}
    DATASET = ""

    def __init__(self, *, source_path: Optional[str] = None, **kwargs):
        self._source_path = source_path
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds_util.features((28, 28, 1), CLASSES[self.DATASET]),
                                     supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        if not self._source_path:
            raise DataError(f"{self.name} needs source_path (a folder of IDX .gz files) to prepare")
        arrays = read_folder(Path(self._source_path))
        for s, (images, _) in arrays.items():
            if images.shape[1:] != (28, 28):
                raise DataError(f"{self._source_path}: {s} images are {images.shape[1:]}, expected (28, 28)")
        return {s: self._generate_examples(*a) for s, a in arrays.items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator:
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[..., None], "label": int(label), "index": i}


class Mnist(_IdxBuilder):
    name = "lightflax_mnist"
    DATASET = "mnist"


class FashionMnist(_IdxBuilder):
    name = "lightflax_fashion_mnist"
    DATASET = "fashion_mnist"


BUILDERS = {"mnist": Mnist, "fashion_mnist": FashionMnist}


def holdout(n: int, size: int = VAL_SIZE, seed: int = VAL_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), both sorted: a fixed ``size``-example hold-out of ``n``."""
    if n <= size:
        size = max(1, n // 10)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[size:]), np.sort(perm[:size])


def split_holdout(full: Split, use_holdout: bool) -> Tuple[Dict[str, Optional[Split]], str]:
    """{'train', 'val'} from the official training set: a fixed hold-out as val, or
    (``use_holdout=False``, the paper's protocol) all of it as train and no val."""
    if not use_holdout:
        return ({"train": full, "val": None},
                f"no hold-out (paper protocol): train = all {len(full)} official training images in their "
                f"original order, no val split")
    tr, va = holdout(len(full))
    return ({"train": Split(full.images[tr], full.labels[tr]), "val": Split(full.images[va], full.labels[va])},
            f"val = a fixed {len(va)}-image hold-out of the {len(full)} official training images (numpy "
            f"default_rng({VAL_SEED}) permutation), train = the other {len(tr)}")


def _prepared_root(data_dir: Optional[str]) -> Optional[str]:
    """Where the TFDS copy goes: ``<data_dir>/tfds`` when --data_dir is given and writable (nothing
    is written outside it), else the cache (``$LIGHTFLAX_DATA_DIR``)."""
    if not data_dir:
        return None
    folder = Path(data_dir).expanduser()
    if os.access(folder, os.W_OK | os.X_OK):
        return str(folder)
    print(f"NOTE: --data_dir {data_dir} is not writable; its prepared copy goes to {locations.cache_root()} "
          f"(set LIGHTFLAX_DATA_DIR to move it)", flush=True)
    return None


def load(name: str, data_dir: Optional[str] = None, download_ok: bool = True, holdout: bool = True) -> DatasetSplits:
    if name not in NAMES:
        raise DataError(f"unknown IDX dataset {name!r}; use one of {NAMES}")
    folder, looked = find(name, data_dir)
    if folder is None and download_ok and not data_dir:
        folder = download(name)  # raises DataError (one line) when offline
    if folder is None:
        hint = " (Debian: apt-get install dataset-fashion-mnist)" if name == "fashion_mnist" else ""
        raise DataError(f"{name} IDX files not found (looked in {', '.join(looked)}); pass --data_dir=FOLDER with "
                        f"train-/t10k-{{images-idx3,labels-idx1}}-ubyte.gz{hint}, or use --dataset=synthetic")
    key = locations.fingerprint([locations.file_fingerprint(folder / f) for p in FILES.values() for f in p])
    target = locations.prepared_dir(_prepared_root(data_dir), name, key)
    builder = tfds_util.prepare(BUILDERS[name], data_dir=target, source_path=str(folder))
    arrays = tfds_util.read_all(builder, ("train", "test"))
    splits, note = split_holdout(Split(*arrays["train"][:2]), holdout)
    splits["test"] = Split(*arrays["test"][:2])
    notes = [note + "; test = the official test set"]
    return DatasetSplits(name, False, 10, CLASSES[name], splits, notes=notes, source=str(folder))
