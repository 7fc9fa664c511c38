"""TFDS plumbing shared by the builders: features, preparation, reading back.

Builders write array_record files of fixed-shape uint8 tensors and are read back
with ``tfds.data_source`` (random access, no TensorFlow). Every example carries its
position in the source (``index``) so the loaded arrays keep the source's order
(TFDS shuffles records by key hash when it writes them).

Preparation writes only under the ``data_dir`` it is given: TFDS's own temporary
folder (an empty ``tmp*tfds`` it would leave in the system temp directory) is
redirected into a private folder that is removed afterwards, and a preparation
that fails removes every folder it created (no empty or half-written copies).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from lightflax import interrupts
from lightflax.errors import DataError

FILE_FORMAT = "array_record"
READ_CHUNK = 1024


def features(shape: Tuple[int, int, int], class_names: Sequence[str], *, with_filename: bool = False):
    """FeaturesDict: image uint8 ``shape``, label ClassLabel, index int64 (+ filename)."""
    import tensorflow_datasets as tfds

    spec = {
        "image": tfds.features.Tensor(shape=tuple(shape), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(class_names)),
        "index": tfds.features.Scalar(dtype=np.int64),
    }
    if with_filename:
        spec["filename"] = tfds.features.Text()
    return tfds.features.FeaturesDict(spec)


@contextlib.contextmanager
def private_tempdir() -> Iterator[Path]:
    """Points :mod:`tempfile` at a fresh private folder and removes it afterwards.

    TFDS calls ``tempfile.mkdtemp("tfds")`` when it builds an unprepared builder
    and never removes the folder; this keeps the system temp directory clean.
    """
    saved = tempfile.tempdir
    private = Path(tempfile.mkdtemp(prefix="lightflax-tfds-"))
    tempfile.tempdir = str(private)
    try:
        yield private
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(private, ignore_errors=True)


def missing_chain(path: Path) -> List[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    chain = []
    p = path.absolute()
    while not p.exists() and p != p.parent:
        chain.append(p)
        p = p.parent
    return chain


def _make_parent(data_dir: Path) -> None:
    """Creates ``data_dir``'s parent, or one line naming the variables that move the cache."""
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in data_dir.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker else (e.strerror or type(e).__name__)
        raise DataError(f"cannot create the data cache folder {data_dir.parent} ({why}); set LIGHTFLAX_DATA_DIR "
                        f"(or XDG_CACHE_HOME) to a writable folder, or pass --data_dir") from None


def _is_prepared(builder) -> bool:
    return (Path(builder.data_dir) / "dataset_info.json").is_file()


def _build(builder_cls, data_dir: Path, config, manual_dir, builder_kwargs):
    import tensorflow_datasets as tfds

    with private_tempdir():
        builder = builder_cls(data_dir=str(data_dir), config=config, file_format=FILE_FORMAT, **builder_kwargs)
        if not _is_prepared(builder):
            download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
            builder.download_and_prepare(download_config=download_config)
    return builder


def prepare(builder_cls, *, data_dir: Path, config: Optional[str] = None, manual_dir: Optional[Path] = None,
            **builder_kwargs: Any):
    """Instantiates ``builder_cls`` under ``data_dir`` and prepares it once (reused afterwards).

    Safe under concurrency: a new copy is built in a private folder beside ``data_dir`` and renamed
    into place in one step; a run that finds the copy already there (another run finished first)
    reuses it and drops its own. On failure nothing this call made is left (the private folder, and
    ``data_dir``'s parents that did not exist, when empty). TFDS's "No examples were yielded" becomes a one-line
    DataError; an unusable cache location is one line naming the variable to set.
    """
    data_dir = Path(data_dir)
    created = missing_chain(data_dir)
    _make_parent(data_dir)
    with private_tempdir():  # TFDS makes a temporary folder for an unprepared builder
        builder = builder_cls(data_dir=str(data_dir), config=config, file_format=FILE_FORMAT, **builder_kwargs)
    if _is_prepared(builder):
        return _build(builder_cls, data_dir, config, manual_dir, builder_kwargs)
    private = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.building-", dir=data_dir.parent))
    try:
        built = _build(builder_cls, private, config, manual_dir, builder_kwargs)
        final = data_dir / Path(built.data_dir).relative_to(private)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(built.data_dir, final)  # atomic: readers see no copy or a whole one
        except OSError:
            if not _is_prepared(builder):  # not another run's finished copy: a real failure
                raise
    except BaseException as e:
        shutil.rmtree(private, ignore_errors=True)
        # only empty folders: a concurrent run's finished copy in the same place stays
        prune_empty_dirs(created[-1] if created else data_dir)
        if isinstance(e, Exception) and "No examples were yielded" in str(e):
            raise DataError(f"{builder_cls.name}: a split has no readable example (every image corrupt or "
                            f"unreadable?); check the source files") from None
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return _build(builder_cls, data_dir, config, manual_dir, builder_kwargs)


def prune_empty_dirs(root: Path) -> None:
    """Removes the empty folders under ``root`` (and ``root`` if it ends up empty); never a file."""
    root = Path(root)
    if not root.is_dir():
        return
    for folder, _, _ in sorted(os.walk(root), key=lambda t: -len(Path(t[0]).parts)):
        with contextlib.suppress(OSError):
            Path(folder).rmdir()  # fails (kept) unless empty


def data_source(builder, split: str):
    """``tfds.data_source`` of one prepared split (random access over array_record)."""
    import tensorflow_datasets as tfds

    name = builder.name
    if builder.builder_config is not None:
        name += f"/{builder.builder_config.name}"
    name += f":{builder.version}"
    return tfds.data_source(name, split=split, data_dir=str(builder.data_dir_root), download=False)


def read_split(source) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """All records of a data source as arrays in source order.

    Returns images uint8 (N, H, W, C), labels int32 (N,), filenames (N,) object or None.
    """
    n = len(source)
    if n == 0:
        raise DataError("a prepared split is empty")
    first = source[0]
    images = np.empty((n, *first["image"].shape), np.uint8)
    labels = np.empty((n,), np.int32)
    index = np.empty((n,), np.int64)
    names = np.empty((n,), object) if "filename" in first else None
    for start in range(0, n, READ_CHUNK):
        interrupts.check()
        stop = min(n, start + READ_CHUNK)
        for i, rec in enumerate(source.__getitems__(list(range(start, stop))), start):
            images[i] = rec["image"]
            labels[i] = rec["label"]
            index[i] = rec["index"]
            if names is not None:
                name = rec["filename"]
                names[i] = name.decode() if isinstance(name, bytes) else str(name)
    order = np.argsort(index, kind="stable")
    return images[order], labels[order], None if names is None else names[order]


def read_all(builder, splits: Sequence[str]) -> Dict[str, Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """``read_split`` of each prepared split of ``builder`` that exists."""
    have = set(builder.info.splits.keys())
    return {s: read_split(data_source(builder, s)) for s in splits if s in have}
