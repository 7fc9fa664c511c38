"""PneumoniaMNIST (MedMNIST v2 / MedMNIST+) from its npz files.

Sources, in order: ``--data_dir`` (the npz file or the folder holding it; nothing
else is tried when it is given); the data cache's ``pneumonia_mnist/`` folder
(``$LIGHTFLAX_DATA_DIR``, else ``$XDG_CACHE_HOME/lightflax/data``, else
``~/.cache/lightflax/data``); for 28x28 the copy embedded in the package
(``lightflax/data/embedded/pneumoniamnist_trainval.npz``: the real train and val
splits, MedMNIST v2, CC BY 4.0, sha256-checked at every load; no test split);
else, when online, the official MedMNIST+ record on Zenodo (into the cache),
checked against the MD5 the ``medmnist`` package lists. Labels: 0 = normal,
1 = pneumonia.

The npz is small (3.7 MB at 28x28) and is read straight into memory: loading
writes nothing anywhere (no prepared copy, no temporary files). Labels must be
integral (an integer dtype or floats that are exactly 0.0 or 1.0); NaN, 0.7 or an
empty train/val split raise a one-line DataError; a split holding a single class
gives a warning and a note. :class:`PneumoniaMnist` is a TFDS builder over the same
file for those who want a prepared TFDS copy (:func:`prepare_tfds`).

A file without a test split (the embedded ``pneumoniamnist_trainval.npz``) gives
``splits['test'] = None`` and a note: train on train, select on val, report test
as null - never test figures computed on val.
"""

from __future__ import annotations

import hashlib
import importlib.resources
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
              f"put the file in the data cache's pneumonia_mnist/ folder, or use --dataset=synthetic for a "
              f"smoke run")

# The copy shipped as package data (see embedded/README.md and NOTICE).
EMBEDDED_FILE = "pneumoniamnist_trainval.npz"
EMBEDDED_SHA256 = "e64ad43508ed6487ac798241978ccbd73dff347afd7e08bcd1c4c20770b2ba65"
EMBEDDED_SOURCE = "embedded"  # DatasetSplits.source starts with this when the embedded copy was used
EMBEDDED_NOTE = ("no PneumoniaMNIST copy given (--data_dir) or cached: using the copy embedded in lightflax "
                 "(real 28x28 chest X-rays, MedMNIST v2, CC BY 4.0; train 4,708 / val 524, no test split)")


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
    return [locations.cache_root() / "pneumonia_mnist"]


def embedded_path() -> Path:
    """The embedded npz inside the installed package (not checked; see :func:`verify_embedded`)."""
    return Path(str(importlib.resources.files("lightflax.data").joinpath("embedded", EMBEDDED_FILE)))


def verify_embedded(path: Optional[Path] = None) -> Path:
    """The embedded npz, its sha256 checked; DataError (one line) when missing or damaged."""
    path = path or embedded_path()
    if not path.is_file():
        raise DataError(f"the embedded PneumoniaMNIST copy is missing ({path}): reinstall lightflax "
                        f"(pip install --force-reinstall .) or {HOW_TO_GET}")
    got = locations.file_digest(path, "sha256")
    if got != EMBEDDED_SHA256:
        raise DataError(f"the embedded PneumoniaMNIST copy {path} is damaged (sha256 {got[:16]}..., expected "
                        f"{EMBEDDED_SHA256[:16]}...): reinstall lightflax (pip install --force-reinstall .) "
                        f"or {HOW_TO_GET}")
    return path


def find(data_dir: Optional[str], size: Optional[int], embedded_ok: bool = True
         ) -> Tuple[Optional[Path], List[str]]:
    """The npz file to use and where it looked.

    With ``data_dir`` only that file or folder is looked at. Otherwise the cache,
    then (28x28 only, ``embedded_ok``) the embedded copy.
    """
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
    looked = [str(f) for f in folders]
    if not data_dir and embedded_ok and size in (None, 28):
        path = embedded_path()
        looked.append(f"{EMBEDDED_SOURCE} copy {path}")
        if path.is_file():
            return path, looked
    return None, looked


def download(size: int) -> Path:
    """Downloads the MedMNIST+ file into ``<cache>/pneumonia_mnist/``; a failed download
    leaves no file and removes the folders it created."""
    dest = locations.cache_root() / "pneumonia_mnist" / file_name(size)
    created = tfds_util.missing_chain(dest.parent)
    try:
        return locations.download(f"{ZENODO}{file_name(size)}?download=1", dest, algorithm="md5",
                                  digest=MD5[size])
    except BaseException:
        for folder in created:  # deepest first; only if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _labels(path: Path, split: str, labels: np.ndarray, n_images: int) -> np.ndarray:
    """``labels`` as int32 (N,) after checking they are exactly 0 or 1; DataError otherwise."""
    what = f"{path}: {split}_labels"
    if labels.ndim != 1 or len(labels) != n_images:
        raise DataError(f"{what} must be {n_images} labels (shape (N,) or (N, 1)), got shape {labels.shape}")
    if labels.dtype == np.bool_:
        return labels.astype(np.int32)
    if np.issubdtype(labels.dtype, np.floating):
        bad = np.flatnonzero(np.isnan(labels))
        if len(bad):
            raise DataError(f"{what} holds {len(bad)} NaN label(s) (first at index {bad[0]}); every label must be "
                            f"0 (normal) or 1 (pneumonia): fix or drop those images")
        bad = np.flatnonzero(labels != np.round(labels))
        if len(bad):
            raise DataError(f"{what} holds {len(bad)} non-integral label(s) (first {labels[bad[0]].item()!r} at index "
                            f"{bad[0]}); labels must be exactly 0 (normal) or 1 (pneumonia), not probabilities")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what} has dtype {labels.dtype}; labels must be integers 0 (normal) or 1 (pneumonia)")
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise DataError(f"{what} holds {len(bad)} label(s) outside {{0, 1}} (first {labels[bad[0]].item()!r} at index "
                        f"{bad[0]}); labels must be 0 (normal) or 1 (pneumonia)")
    return labels.astype(np.int32)


def read_npz(path: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (N, S, S), labels int32 (N,))} for the splits in the file.

    Raises DataError (one line) for an unreadable file, missing train/val, images
    that are not uint8 (N, S, S), sizes that differ between splits, labels that are
    not exactly 0/1 (NaN, 0.7, 2, strings), or an empty train or val split. An
    empty test split counts as absent.
    """
    raw = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            for s in SPLITS:
                if f"{s}_images" in keys:
                    if f"{s}_labels" not in keys:
                        raise DataError(f"{path} has {s}_images but no {s}_labels: not a PneumoniaMNIST npz")
                    raw[s] = (z[f"{s}_images"], np.asarray(z[f"{s}_labels"]))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a readable npz file ({type(e).__name__}: {e}); re-download it") from None
    if "train" not in raw or "val" not in raw:
        raise DataError(f"{path} lacks train_images/val_images: not a PneumoniaMNIST npz")
    out = {}
    for s, (images, labels) in raw.items():
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise DataError(f"{path}: {s}_images must be uint8 (N, S, S) grayscale, got {images.dtype} "
                            f"{images.shape}")
        if len(images) == 0:
            if s == "test":
                continue
            raise DataError(f"{path}: the {s} split is empty; a PneumoniaMNIST npz needs train and val images")
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        out[s] = (images, _labels(path, s, labels, len(images)))
    sizes = {images.shape[1] for images, _ in out.values()}
    if len(sizes) > 1:
        raise DataError(f"{path}: the splits hold images of different sizes {sorted(sizes)}; use one MedMNIST+ file")
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


def prepare_tfds(path: Path, data_dir: Path, size: int = 28):
    """A prepared TFDS copy of ``path`` under ``data_dir`` (for ``tfds.data_source`` users).

    :func:`load` does not need it; nothing is written unless this is called.
    """
    return tfds_util.prepare(PneumoniaMnist, data_dir=data_dir, config=str(size), source_path=str(path))


def load(data_dir: Optional[str] = None, size: Optional[int] = None, download_ok: bool = True,
         embedded_ok: bool = True) -> DatasetSplits:
    """Loads PneumoniaMNIST into memory; ``size`` None: 28 or whatever ``data_dir`` holds.

    ``data_dir`` given: that file or folder must hold the data (never a fallback).
    Otherwise the cache, then the embedded copy (28x28, ``embedded_ok``), then a
    download into the cache (``download_ok``; other sizes only in practice).
    """
    if size is not None and size not in SIZES:
        raise DataError(f"pneumonia_mnist comes in {', '.join(map(str, SIZES))} pixels, not {size}")
    path, looked = find(data_dir, size, embedded_ok=embedded_ok)
    if path is None and download_ok and not data_dir:
        path = download(size or 28)  # raises DataError (one line) when offline
    if path is None and data_dir:
        names = ", ".join(c.name for c in candidates(Path("."), size))
        raise DataError(f"PneumoniaMNIST not found: --data_dir {data_dir} is neither an npz file nor a folder "
                        f"holding one of {names}; pass the right file or folder, or leave --data_dir out to "
                        f"use the cached or embedded copy")
    if path is None:
        raise DataError(f"PneumoniaMNIST not found (looked in {', '.join(looked)}); {HOW_TO_GET}")
    embedded = not data_dir and path == embedded_path()
    if embedded:
        verify_embedded(path)
    arrays = read_npz(path)
    stored = int(arrays["train"][0].shape[1])
    if size is not None and stored != size:
        raise DataError(f"{path} holds {stored}x{stored} images, not {size}x{size}; pass the matching "
                        f"--image_size or the file of that size")
    if stored not in SIZES:
        raise DataError(f"{path} holds {stored}x{stored} images; PneumoniaMNIST sizes are {SIZES}")
    splits: Dict[str, Optional[Split]] = {s: None for s in SPLITS}
    for s, (images, labels) in arrays.items():
        splits[s] = Split(images, labels)
    notes = [EMBEDDED_NOTE] if embedded else []
    if splits["test"] is None:
        notes.append(f"{path.name} has no test split: trained on train, selected on val; test columns are null "
                     f"(never computed on val)")
    for s, split in splits.items():  # train: experiments.training.check_train_classes (every real data set)
        if s != "train" and split is not None and len(np.unique(split.labels)) < 2:
            only = CLASSES[int(split.labels[0])]
            raise DataError(f"the {s} split of {path} holds a single class ({only}, {len(split)} images): "
                            f"checkpoint selection, the decision threshold and ROC AUC need both classes; "
                            f"use an npz whose {s} split holds images of both")
    dup = _overlap(splits["train"].images, splits["val"].images)
    if dup:
        notes.append(f"{dup} val image(s) also occur byte-identical in train (present in the original data)")
    source = (f"{EMBEDDED_SOURCE} copy lightflax/data/embedded/{EMBEDDED_FILE} (sha256 verified)" if embedded
              else str(path))
    return DatasetSplits("pneumonia_mnist", False, 2, list(CLASSES), splits, notes=notes, source=source)
