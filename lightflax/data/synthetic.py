"""Deterministic random images and labels of any shape and class count (benchmarks, smoke runs).

Results produced from it always say "synthetic" (``DatasetSplits.synthetic`` and notes).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from lightflax.data.types import DatasetSplits, Split
from lightflax.errors import DataError

DEFAULT_SIZES = {"train": 256, "val": 64, "test": 64}
SPLIT_SALT = {"train": 0, "val": 1, "test": 2}


def load(shape: Sequence[int] = (28, 28, 1), num_classes: int = 2, sizes: Optional[Dict[str, int]] = None,
         seed: int = 0) -> DatasetSplits:
    """uint8 images (N, *shape) uniform in [0, 255], int32 labels uniform in [0, num_classes)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"synthetic_shape must be (H, W, C) with positive sizes, got {shape}")
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLIT_SALT)
    if unknown:
        raise DataError(f"synthetic_sizes has unknown split(s) {sorted(unknown)}; use train, val, test")
    splits: Dict[str, Optional[Split]] = {s: None for s in SPLIT_SALT}
    for split, n in sizes.items():
        if n < 1:
            raise DataError(f"synthetic_sizes[{split!r}] must be >= 1, got {n}")
        rng = np.random.default_rng([seed, SPLIT_SALT[split], 7919])
        splits[split] = Split(rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
                              rng.integers(0, num_classes, size=n).astype(np.int32))
    return DatasetSplits("synthetic", True, num_classes, [f"class_{i}" for i in range(num_classes)], splits,
                         notes=["synthetic data: random images and labels; accuracy figures are meaningless"],
                         source="synthetic")
