"""Input path: device-resident splits with on-device batching, and a streaming fallback.

Device-resident (:class:`DeviceData`): a split that fits is put on the accelerator
once as uint8 (replicated on every device of the mesh; the X-ray train split at
299x299x1 is 0.47 GB). Each epoch draws a permutation from (seed, epoch); batch
``step`` is gathered on device by :func:`get_batch`, a pure jittable function of
(images, labels, perm, step) that a train step can call inside its own jit - no
host-to-device copy per step. With a mesh, batches come out sharded on axis 0
over the mesh axis ``'batch'`` (data parallelism). :func:`preprocess` turns
uint8 batches into model input on device.

Streaming (:func:`stream_batches`): for data that does not fit, a background
thread gathers batches on the host (numpy arrays or a ``tfds.data_source``) in
the same order and ``jax.device_put``s them ``prefetch`` steps ahead (double
buffering with the default 2).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"


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
    """int32 (n,): the order of epoch ``epoch``, drawn from (seed, epoch)."""
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    return jax.random.permutation(key, n).astype(jnp.int32)


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_remainder else -(-n // batch_size)


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


# ----------------------------------------------------------------------------
# device-resident split
# ----------------------------------------------------------------------------


def batch_sharding(mesh: Optional[Mesh]) -> Optional[NamedSharding]:
    """Axis 0 split over the mesh's 'batch' axis (None without a mesh)."""
    return None if mesh is None else NamedSharding(mesh, P(AXIS))


def replicated_sharding(mesh: Optional[Mesh]) -> Optional[NamedSharding]:
    return None if mesh is None else NamedSharding(mesh, P())


class DeviceData:
    """A split held on device as uint8 (replicated over ``mesh``), batched on device.

    Attributes: images uint8 (N, H, W, C), labels int32 (N,) - device arrays.
    """

    def __init__(self, split: Any, mesh: Optional[Mesh] = None):
        images, labels = (split.images, split.labels) if hasattr(split, "images") else split
        images, labels = np.asarray(images), np.asarray(labels, np.int32)
        if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (len(images),):
            raise ValueError(f"DeviceData needs uint8 (N, H, W, C) images and (N,) labels, got "
                             f"{images.dtype} {images.shape} / {labels.shape}")
        self.mesh = mesh
        self.n = len(labels)
        rep = replicated_sharding(mesh)
        self.images = jax.device_put(images, rep) if rep is not None else jax.device_put(images)
        self.labels = jax.device_put(labels, rep) if rep is not None else jax.device_put(labels)
        out = batch_sharding(mesh)
        self._batch = jax.jit(get_batch, static_argnums=4, out_shardings=out)
        self._eval_batch = jax.jit(get_eval_batch, static_argnums=3, out_shardings=out)
        self._perm = jax.jit(epoch_permutation, static_argnums=2, out_shardings=rep)

    def __len__(self) -> int:
        return self.n

    def num_batches(self, batch_size: int, drop_remainder: bool = True) -> int:
        return num_batches(self.n, batch_size, drop_remainder)

    def epoch_permutation(self, seed: int, epoch: int) -> jax.Array:
        return self._perm(seed, epoch, self.n)

    def batch(self, perm: jax.Array, step: int, batch_size: int) -> Tuple[jax.Array, jax.Array]:
        """Training batch ``step`` (see :func:`get_batch`), sharded over the mesh."""
        if self.mesh is not None and batch_size % self.mesh.devices.size:
            raise ValueError(f"batch size {batch_size} is not divisible by {self.mesh.devices.size} devices")
        return self._batch(self.images, self.labels, perm, jnp.int32(step), batch_size)

    def epoch(self, seed: int, epoch: int, batch_size: int) -> Iterator[Tuple[jax.Array, jax.Array]]:
        """All drop-remainder training batches of one epoch."""
        perm = self.epoch_permutation(seed, epoch)
        for step in range(self.num_batches(batch_size)):
            yield self.batch(perm, step, batch_size)

    def eval_batches(self, batch_size: int) -> Iterator[Tuple[jax.Array, jax.Array, jax.Array]]:
        """(images, labels, mask) covering every example once, the last batch padded."""
        for start in range(0, self.n, batch_size):
            yield self._eval_batch(self.images, self.labels, jnp.int32(start), batch_size)


# ----------------------------------------------------------------------------
# streaming (host-resident data)
# ----------------------------------------------------------------------------


def _gather(source: Any, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 images and int32 labels of ``idx`` from a Split, (images, labels) or a data source."""
    if hasattr(source, "images"):
        return np.asarray(source.images[idx]), np.asarray(source.labels[idx], np.int32)
    if isinstance(source, tuple):
        return np.asarray(source[0][idx]), np.asarray(source[1][idx], np.int32)
    get = getattr(source, "__getitems__", None)
    records = get(list(map(int, idx))) if get else [source[int(i)] for i in idx]
    return (np.stack([r["image"] for r in records]).astype(np.uint8),
            np.asarray([r["label"] for r in records], np.int32))


def stream_batches(source: Any, batch_size: int, seed: int, epoch: int, mesh: Optional[Mesh] = None,
                   prefetch: int = 2, drop_remainder: bool = True) -> Iterator[Tuple[jax.Array, jax.Array]]:
    """Device batches of one epoch of host-resident data, ``prefetch`` batches ahead.

    ``source``: a Split, an (images, labels) tuple of arrays (numpy or memory-mapped),
    or a random-access data source of {'image', 'label'} records (``tfds.data_source``).
    The order is :func:`epoch_permutation` (seed, epoch), as in :class:`DeviceData`;
    indices within a batch keep that order. Without ``drop_remainder`` the last,
    smaller batch is yielded too (it must still divide over the mesh).
    """
    n = len(source[1]) if isinstance(source, tuple) else len(source)
    order = np.asarray(epoch_permutation(seed, epoch, n))
    sharding = batch_sharding(mesh)
    steps = num_batches(n, batch_size, drop_remainder)
    q: "queue.Queue" = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for step in range(steps):
                x, y = _gather(source, order[step * batch_size:(step + 1) * batch_size])
                if not put(jax.device_put((x, y), sharding) if sharding is not None else jax.device_put((x, y))):
                    return
            put(done)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    thread = threading.Thread(target=work, daemon=True, name="lightflax-stream")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


