"""The input path: device-resident splits, batched and preprocessed on device.

A split is put on the accelerator once as uint8 (replicated on every device of
the mesh by the trainer; the X-ray train split at 299x299x1 is 0.47 GB). Each
epoch draws a permutation from (seed, epoch) (:func:`epoch_permutation`); batch
``step`` is gathered on device by :func:`get_batch`, a pure jittable function of
(images, labels, perm, step) that the train step calls inside its own jit - no
host-to-device copy per step (each device takes its own local batch).
:func:`get_eval_batch` walks a split in stored order with a padding mask, and
:func:`preprocess` turns uint8 batches into model input on device.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------
# preprocessing (on device)
# ----------------------------------------------------------------------------


def preprocess(images: jax.Array, *, out_size: Optional[int], channels: int,
               mean: Optional[Sequence[float]] = None) -> jax.Array:
    """uint8 (B, H, W, C) -> float32 (B, S, S, channels): [0, 1] minus ``mean``.

    Bilinear resize to ``out_size`` (antialiased when shrinking, like Pillow's
    bilinear resize that Keras' ``load_img`` uses) when it differs from (H, W);
    gray -> RGB replication when ``channels`` is 3 and C is 1 (RGB -> gray by
    ITU-R 601 luma for the opposite); /255; optional per-channel mean
    subtraction (``mean`` has ``channels`` entries, or 1). Jittable.
    """
    if images.ndim != 4:
        raise ValueError(f"preprocess expects (B, H, W, C) images, got shape {tuple(images.shape)}")
    x = images.astype(jnp.float32) / 255.0
    if out_size is not None and (x.shape[1], x.shape[2]) != (out_size, out_size):
        x = jax.image.resize(x, (x.shape[0], out_size, out_size, x.shape[3]), method="bilinear", antialias=True)
    c = x.shape[-1]
    if channels != c:
        if c == 1:
            x = jnp.broadcast_to(x, x.shape[:-1] + (channels,))
        elif channels == 1 and c == 3:
            x = jnp.sum(x * jnp.asarray([0.299, 0.587, 0.114], jnp.float32), axis=-1, keepdims=True)
        else:
            raise ValueError(f"cannot turn {c}-channel images into {channels} channels")
    if mean is not None:
        x = x - jnp.asarray(mean, jnp.float32).reshape(1, 1, 1, -1)
    return x


def channel_mean(images: np.ndarray) -> Tuple[float, ...]:
    """Per-channel mean of uint8 images (N, H, W, C) in [0, 1] units (for ``mean=``)."""
    flat = np.asarray(images).reshape(-1, images.shape[-1])
    total = np.zeros(flat.shape[1], np.float64)
    for start in range(0, len(flat), 1 << 22):  # bounded float64 temporaries
        total += flat[start:start + (1 << 22)].sum(0, dtype=np.float64)
    return tuple(float(t) / len(flat) / 255.0 for t in total)


# ----------------------------------------------------------------------------
# order and batching (pure, jittable)
# ----------------------------------------------------------------------------


def epoch_permutation(seed: int, epoch: int, n: int) -> jax.Array:
    """int32 (n,): the order of epoch ``epoch``, drawn from (seed, epoch). Jittable (seed and
    epoch may be traced; the trainer vmaps it over the replicas' seeds)."""
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    return jax.random.permutation(key, n).astype(jnp.int32)


def get_batch(images: jax.Array, labels: jax.Array, perm: jax.Array, step: jax.Array,
              batch_size: int) -> Tuple[jax.Array, jax.Array]:
    """Batch ``step`` of an epoch: ``images[perm[step*B:(step+1)*B]]`` and its labels.

    images uint8 (N, H, W, C), labels int32 (N,), perm int32 (N,), step int32 scalar
    (traced is fine), batch_size static. Returns uint8 (B, H, W, C), int32 (B,).
    Drop-remainder: step must be < N // B.
    """
    idx = jax.lax.dynamic_slice_in_dim(perm, step * batch_size, batch_size)
    return jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0)


def get_eval_batch(images: jax.Array, labels: jax.Array, start: jax.Array,
                   batch_size: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Examples ``start .. start+B-1`` in stored order, padded past the end.

    Returns uint8 (B, H, W, C), int32 (B,), bool mask (B,) (False on padding,
    which repeats the last example). Iterating ``start`` over
    ``range(0, N, B)`` visits every example exactly once.
    """
    n = images.shape[0]
    idx = start + jnp.arange(batch_size, dtype=jnp.int32)
    mask = idx < n
    idx = jnp.minimum(idx, n - 1)
    return jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0), mask
