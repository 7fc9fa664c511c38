"""Pooled backbone features, computed once (batched, jitted) and cached on disk.

The cache entry ``<cache_dir>/<backbone>-<key hash>.npy`` (+ ``.json`` with the
full key) is keyed by the caller's ``key_parts`` plus the backbone name, the
sha256 of its weights, its resolution and normalisation, and a sha256 of the
images themselves, so a stale entry is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from lightflax import files, interrupts, progress
from lightflax.pretrained.backbone import Backbone, check_images

FORMAT_VERSION = 1


def _images_sha256(images: np.ndarray) -> str:
    h = hashlib.sha256(f"{images.dtype.str}{images.shape}".encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def cache_key(backbone: Backbone, images: np.ndarray, key_parts: Mapping[str, Any]) -> Dict[str, Any]:
    """The full JSON-able key of a cache entry."""
    return {
        **{str(k): v for k, v in key_parts.items()},
        "format": FORMAT_VERSION,
        "backbone_name": backbone.name,
        "include_top": backbone.include_top,
        "weights_sha256": backbone.weights_sha256,
        "resolution": backbone.resolution,
        "normalisation": [backbone.offset, backbone.scale],
        **({"channel_order": "BGR"} if backbone.bgr else {}),
        "images_sha256": _images_sha256(images),
        "images_shape": list(images.shape),
        # A trunk (fine-tuning) caches the activation before this block; absent for pooled features.
        **({"stop_block": backbone.module.stop_block}
           if getattr(backbone.module, "stop_block", None) is not None else {}),
    }


def _key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def compute(backbone: Backbone, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, D) float32 features, in fixed-size jitted batches.

    The last batch is padded to ``batch_size`` so one compilation serves all.
    """
    check_images(images)
    fn = backbone.features_from_pixels
    n = images.shape[0]
    out = []
    with progress.phase(-(-n // batch_size), f"{backbone.name} features of {n} images", unit="batch") as bar:
        for start in range(0, n, batch_size):
            interrupts.check()
            batch = np.asarray(images[start:start + batch_size])
            real = batch.shape[0]
            if real < batch_size and n > batch_size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
            out.append(np.asarray(fn(backbone.variables, jnp.asarray(batch)))[:real])
            bar.update()
    if not out:
        return np.zeros((0, *backbone.output_shape), np.float32)
    return np.concatenate(out).astype(np.float32)


def extract_cached(backbone: Backbone, images: np.ndarray, *, cache_dir: str,
                   key_parts: Optional[Mapping[str, Any]] = None, batch_size: int = 32) -> np.ndarray:
    """(N, H, W, C in {1, 3}) uint8 -> (N, D) float32 pooled features (or (N, h, w, c)
    activations of a ``Backbone.trunk``), cached on disk.

    A cache hit needs an identical key (see ``cache_key``) and an array of
    shape (N, D); anything else is recomputed and overwritten atomically.
    """
    images = np.asarray(images)
    check_images(images)
    key = cache_key(backbone, images, key_parts or {})
    stem = os.path.join(cache_dir, f"{backbone.name}-{_key_digest(key)}")
    npy, meta = stem + ".npy", stem + ".json"
    if os.path.isfile(npy) and os.path.isfile(meta):
        try:
            with open(meta) as f:
                stored = json.load(f)
            feats = np.load(npy)
            if stored == json.loads(json.dumps(key, default=str)) and feats.shape == (
                    images.shape[0], *backbone.output_shape):
                return feats
        except (OSError, ValueError):
            pass  # damaged entry: recompute below
    feats = compute(backbone, images, batch_size)
    os.makedirs(cache_dir, exist_ok=True)
    files.atomic_write(npy, lambda f: np.save(f, feats))
    files.atomic_write(meta, lambda f: f.write(json.dumps(key, sort_keys=True, indent=1, default=str).encode()))
    return feats
