"""The study's data: Chest X-Ray Images (Pneumonia), Kermany et al. 2018, as a TFDS builder.

Manual download (Kaggle paultimothymooney/chest-xray-pneumonia or Mendeley
rscbjbr9sj v3, CC BY 4.0); layout::

    chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg

``manual_dir`` may name the folder holding ``chest_xray/`` or ``chest_xray/``
itself. The Kaggle copy's nested duplicate ``chest_xray/chest_xray`` (used only
when the outer folder lacks the splits), ``__MACOSX`` and hidden files such as
``.DS_Store`` are ignored. The class folders of every split must be exactly
NORMAL and PNEUMONIA (NORMAL=0, PNEUMONIA=1). Images are decoded with Pillow,
converted to 8-bit grayscale (16-bit PNGs scaled by their real bit depth, see
:func:`to_gray8`) and resized (bilinear, as Keras' ``load_img``) to the
builder config's resolution, then written once as uint8 tensors into array_record
files under ``<data_dir>/tfds/chest_xray-<source key>/``; later runs read them back
with ``tfds.data_source`` (no TensorFlow involved).

Corrupt or unreadable images are never silent: they are counted and their first
paths recorded in the prepared dataset's metadata, printed, and put in the
dataset notes (``on_corrupt='skip'``), or they stop the run (``'fail'``).
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from lightflax import interrupts
from lightflax.data import locations, tfds_util
from lightflax.data.types import TINY, DatasetSplits, Split
from lightflax.errors import DataError

CLASSES = ("NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
RESOLUTIONS = (299, 224, 128, 64)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
ON_CORRUPT = ("skip", "fail")
MAX_REPORTED = 20
HOW_TO_GET = ("download 'Chest X-Ray Images (Pneumonia)' (kaggle.com/datasets/paultimothymooney/"
              "chest-xray-pneumonia or data.mendeley.com/datasets/rscbjbr9sj/3) and pass --manual_dir=FOLDER "
              "holding chest_xray/, or use --dataset=pneumonia_mnist (28x28 version, shared folder or download), "
              "or --dataset=synthetic for a smoke run")

Listing = Dict[str, List[Tuple[str, int]]]  # split -> [(path relative to root, label)]


def default_manual_dirs() -> List[Path]:
    return [locations.cache_root() / "manual", locations.cache_root()]


def find_root(manual_dir: Optional[str]) -> Tuple[Optional[Path], List[str]]:
    """The ``chest_xray`` folder holding the splits, and every folder it looked in."""
    bases = [Path(manual_dir).expanduser()] if manual_dir else default_manual_dirs()
    looked: List[str] = []
    for base in bases:
        for cand in (base, base / "chest_xray", base / "chest_xray" / "chest_xray"):
            looked.append(str(cand))
            if all((cand / s).is_dir() for s in ("train", "test")):
                return cand, looked
    return None, looked


def _visible(p: Path) -> bool:
    return not p.name.startswith((".", "__MACOSX"))


def _images(folder: Path) -> List[Path]:
    """Every image file under ``folder``, its subfolders included (hidden entries skipped), sorted."""
    found: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [n for n in dirnames if _visible(Path(n))]
        found += [Path(dirpath) / f for f in filenames
                  if _visible(Path(f)) and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _misplaced_class_folder(folder: Path) -> None:
    """A class folder inside another class folder (train/PNEUMONIA/NORMAL): its images would take the
    outer label; refused in one line."""
    for dirpath, dirnames, _ in os.walk(folder):
        for n in dirnames:
            if n.upper() in CLASSES and n.upper() != folder.name:  # train/NORMAL/NORMAL: same label, used
                raise DataError(f"{Path(dirpath) / n} is a class folder inside {folder}: images below a class "
                                f"folder take its label; move it to {folder.parent / n.upper()}")


_NEEDS = {"train": "train", "val": "select the checkpoint and fit the decision threshold (ROC AUC is undefined "
          "on one class)", "test": "be scored (ROC AUC is undefined on one class)"}


def _split_files(root: Path, split: str, notes: List[str], nested: List[str]) -> List[Tuple[str, int]]:
    """(path relative to root, label) of one split's images, subfolders of a class folder included."""
    d = root / split
    classes = sorted(p.name for p in d.iterdir() if p.is_dir() and _visible(p))
    if tuple(classes) != CLASSES:
        raise DataError(f"{d} must hold exactly the class folders NORMAL and PNEUMONIA, found "
                        f"{', '.join(classes) or 'none'}; fix the folder layout")
    files: List[Tuple[str, int]] = []
    for label, cls in enumerate(CLASSES):
        _misplaced_class_folder(d / cls)
        found = _images(d / cls)
        if not found:  # train: nothing to learn the class from; val/test: AUC and the decision undefined
            raise DataError(f"{d / cls} holds no images: the {split} split needs images of both classes "
                            f"(NORMAL and PNEUMONIA) to {_NEEDS[split]}; put that class's images there")
        nested += [str(f.relative_to(root)) for f in found if f.parent != d / cls]
        files += [(str(f.relative_to(root)), label) for f in found]
    return files


def scan(root: Path) -> Tuple[Listing, List[str]]:
    """Lists the images of each split; returns (listing, notes). The whole layout is checked here,
    before any image is decoded.

    Images in subfolders of a class folder are used with that class's label (a note says how many);
    a class folder inside another one is refused. Raises DataError when a split's class folders are
    not exactly NORMAL and PNEUMONIA, or when a class folder of any split holds no image (every split
    needs both classes).
    """
    listing: Listing = {}
    notes: List[str] = []
    nested: List[str] = []
    if (root / "chest_xray").is_dir():
        notes.append(f"ignored the nested duplicate folder {root / 'chest_xray'} (Kaggle copy)")
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            if split == "val":
                notes.append(f"{d} does not exist: no val split")
                continue
            raise DataError(f"{d} does not exist; {root} must hold train/, val/ and test/ folders")
        files = _split_files(root, split, notes, nested)
        if not files and split != "val":
            raise DataError(f"{d} holds no images; re-download or re-extract the data set")
        listing[split] = files
    if nested:
        notes.append(f"data: {len(nested)} image(s) in subfolders of class folders, used with "
                     f"their class folder's label (first: {nested[0]})")
    return listing, notes


def source_key(root: Path, listing: Listing) -> str:
    """Identity of the source folder: path plus every file's name, size and mtime."""
    parts: list = [str(root.resolve())]
    for split in sorted(listing):
        for rel, label in listing[split]:
            st = (root / rel).stat()
            parts.append((rel, label, st.st_size, st.st_mtime_ns))
    return locations.fingerprint(parts)


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
STANDARD_DEPTHS = (8, 10, 12, 14, 16)


def png_significant_bits(path: Path) -> Optional[int]:
    """The gray sample's significant bits from a PNG's sBIT chunk, or None.

    Pillow does not expose sBIT; the chunk (if any) precedes the first IDAT.
    """
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind == b"sBIT":
                    data = f.read(length)
                    return int(data[0]) if data else None
                if kind in (b"IDAT", b"IEND"):
                    return None
                f.seek(length + 4, 1)  # data + CRC
    except OSError:
        return None


def bit_depth(values: np.ndarray, significant_bits: Optional[int] = None) -> int:
    """The bit depth a high-depth grayscale image is scaled by.

    ``significant_bits`` (PNG sBIT) when given; else the smallest standard depth
    (8, 10, 12, 14, 16; more bits for 32-bit data) whose range holds the image's
    maximum - a 12-bit X-ray stored in 16 bits is scaled by 4095, not 65535.
    """
    if significant_bits:
        return int(significant_bits)
    top = int(np.ceil(float(values.max()))) if values.size else 0
    need = max(1, top.bit_length())
    for d in STANDARD_DEPTHS:
        if need <= d:
            return d
    return need


def to_gray8(im, significant_bits: Optional[int] = None):
    """A Pillow image as an 8-bit grayscale ('L') image.

    8-bit modes go through ``convert('L')``. 16/32-bit grayscale (I;16, I;16B, I,
    F) is scaled by its real bit depth (:func:`bit_depth`) to 0..255 and rounded -
    ``convert('L')`` would clip it (mostly white). Float images with values in
    [0, 1] are scaled by 255. Negative or non-finite values raise ValueError (the
    image is then reported as unreadable, never guessed).
    """
    from PIL import Image

    if im.mode not in HIGH_DEPTH_MODES:
        return im.convert("L")
    values = np.asarray(im, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"mode {im.mode} image with shape {values.shape} is not grayscale")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"mode {im.mode} image holds NaN or infinite pixel values")
    if values.size and values.min() < 0:
        raise ValueError(f"mode {im.mode} image holds negative pixel values (min {values.min():g}); "
                         f"cannot infer its intensity scale")
    if im.mode == "F" and values.size and values.max() <= 1.0 and not significant_bits:
        top = 1.0
    else:
        top = float(2 ** bit_depth(values, significant_bits) - 1)
    if values.size and values.max() > top:
        raise ValueError(f"mode {im.mode} image has values up to {values.max():g}, above its "
                         f"{significant_bits}-bit depth")
    gray = np.rint(values * (255.0 / top)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray)  # uint8 (H, W) -> mode L


def decode_sized(path: Path, resolution: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Pillow decode -> 8-bit grayscale (:func:`to_gray8`) -> bilinear resize.

    Returns uint8 (R, R) and the image's original (width, height).
    """
    from PIL import Image

    with Image.open(path) as im:
        size = im.size
        sbit = png_significant_bits(path) if im.format == "PNG" and im.mode in HIGH_DEPTH_MODES else None
        im = to_gray8(im, sbit)
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8), size


def decode(path: Path, resolution: int) -> np.ndarray:
    """Pillow decode -> 8-bit grayscale (:func:`to_gray8`) -> bilinear resize; uint8 (R, R)."""
    return decode_sized(path, resolution)[0]


def _try_decode(path: Path, resolution: int):
    """(image, error, original size): image None and a one-line error for an unreadable file."""
    try:
        image, size = decode_sized(path, resolution)
        return image, None, size
    except Exception as e:  # Pillow raises many types for damaged files
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", None


class ChestXray(tfds.core.GeneratorBasedBuilder):
    """Chest X-Ray Images (Pneumonia), grayscale uint8, one config per stored resolution."""

    name = "lightflax_chest_xray"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Grayscale uint8 tensors, Pillow bilinear resize.",
                     "1.1.0": "16-bit grayscale scaled by its real bit depth instead of clipped."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=str(r), description=f"{r}x{r} grayscale")
                       for r in RESOLUTIONS]
    DEFAULT_CONFIG_NAME = "299"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg in manual_dir."

    @property
    def resolution(self) -> int:
        return int(self.builder_config.name)

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description="Chest X-Ray Images (Pneumonia), Kermany et al. 2018, grayscale, resized with Pillow.",
            features=tfds_util.features((r, r, 1), CLASSES, with_filename=True),
            supervised_keys=("image", "label"),
            homepage="https://data.mendeley.com/datasets/rscbjbr9sj/3",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root, looked = find_root(str(dl_manager.manual_dir))
        if root is None:
            raise DataError(f"chest X-ray folders not found (looked in {', '.join(looked)}); {HOW_TO_GET}")
        listing, _ = scan(root)
        self.info.metadata["corrupt"] = []
        self.info.metadata["num_corrupt"] = 0
        self.info.metadata["tiny"] = []
        self.info.metadata["num_tiny"] = 0
        return {split: self._generate_examples(root, files) for split, files in listing.items() if files}

    def _generate_examples(self, root: Path, files: List[Tuple[str, int]]) -> Iterator:
        workers = max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            decoded = pool.map(lambda f: _try_decode(root / f[0], self.resolution), files)
            for index, ((rel, label), (image, error, size)) in enumerate(zip(files, decoded)):
                interrupts.check()
                if error is not None:
                    self.info.metadata["num_corrupt"] += 1
                    if len(self.info.metadata["corrupt"]) < MAX_REPORTED:
                        self.info.metadata["corrupt"].append(f"{root / rel} ({error})")
                    continue
                if min(size) < TINY:
                    self.info.metadata["num_tiny"] += 1
                    if len(self.info.metadata["tiny"]) < MAX_REPORTED:
                        self.info.metadata["tiny"].append(f"{root / rel} ({size[0]}x{size[1]})")
                yield rel, {"image": image[..., None], "label": label, "index": index, "filename": rel}


def load(manual_dir: Optional[str] = None, data_dir: Optional[str] = None, resolution: int = 299,
         on_corrupt: str = "skip") -> DatasetSplits:
    """Prepares (once) and loads the chest X-ray splits at ``resolution``."""
    if resolution not in RESOLUTIONS:
        raise DataError(f"chest_xray is stored at {', '.join(map(str, RESOLUTIONS))} pixels, not {resolution}; "
                        f"pass one of those (the model's input size is set on device by --image_size)")
    if on_corrupt not in ON_CORRUPT:
        raise DataError(f"--on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
    root, looked = find_root(manual_dir)
    if root is None:
        raise DataError(f"chest X-ray folders not found (looked in {', '.join(looked)}); {HOW_TO_GET}")
    listing, notes = scan(root)
    for note in notes:
        if note.startswith("data: "):  # images in subfolders of a class folder
            print(note, flush=True)
    target = locations.prepared_dir(data_dir, "chest_xray", source_key(root, listing))
    builder = tfds_util.prepare(ChestXray, data_dir=target, config=str(resolution), manual_dir=root)
    corrupt = list(builder.info.metadata.get("corrupt", []))
    num_corrupt = int(builder.info.metadata.get("num_corrupt", 0))
    if num_corrupt:
        msg = (f"{num_corrupt} corrupt or unreadable image(s) in {root}, first: {'; '.join(corrupt[:3])}")
        if on_corrupt == "fail":
            raise DataError(f"{msg}; delete or replace them, or pass --on_corrupt=skip")
        notes.append(f"skipped {msg}")
        print(f"WARNING: skipped {msg}", file=sys.stderr, flush=True)
    num_tiny = int(builder.info.metadata.get("num_tiny", 0))
    if num_tiny:
        tiny = list(builder.info.metadata.get("tiny", []))
        msg = (f"{num_tiny} image(s) in {root} are smaller than {TINY}x{TINY} pixels (kept, upscaled to "
               f"{resolution}x{resolution}), first: {'; '.join(tiny[:3])}")
        notes.append(msg)
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)
    arrays = tfds_util.read_all(builder, SPLITS)
    splits: Dict[str, Optional[Split]] = {s: None for s in SPLITS}
    for s, (images, labels, _) in arrays.items():
        splits[s] = Split(images, labels)
    if splits["val"] is not None and len(splits["val"].labels) < 100:
        notes.append(f"the val split has only {len(splits['val'].labels)} images (the Kaggle layout's 16): "
                     f"checkpoint selection on it is noisy")
    return DatasetSplits("chest_xray", False, len(CLASSES), list(CLASSES), splits, notes=notes,
                         source=f"{root} (prepared: {builder.data_dir})")
