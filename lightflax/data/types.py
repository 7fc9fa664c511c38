"""The containers every loader returns."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import numpy as np

from lightflax.errors import DataError

TINY = 32  # images with a side under this many pixels are kept but reported (no real chest X-ray is that small)


@dataclasses.dataclass
class Split:
    """One split in host memory.

    images: uint8 (N, H, W, C) (C=1 for grayscale; (N, H, W) input gets C=1); derived
      splits (e.g. frozen-backbone features, lightflax.transfer) may hold float (N, D).
    labels: int32 (N,) (any integer dtype or (N, 1) input is converted).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        images = np.asarray(self.images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim not in (2, 4):
            raise DataError(f"images must be (N, H, W[, C]) (or (N, D) features), got shape {images.shape}")
        labels = np.asarray(self.labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be integers of shape (N,), got {labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class DatasetSplits:
    """A dataset as loaded: splits 'train', 'val', 'test' (None when absent) and provenance."""

    name: str
    synthetic: bool
    num_classes: int
    class_names: List[str]
    splits: Dict[str, Optional[Split]]
    notes: List[str] = dataclasses.field(default_factory=list)
    source: str = ""

    def summary(self) -> str:
        parts = [f"{k} {'none' if v is None else len(v)}" for k, v in self.splits.items()]
        tag = "SYNTHETIC" if self.synthetic else self.source
        return f"{self.name} ({tag}): " + ", ".join(parts)
