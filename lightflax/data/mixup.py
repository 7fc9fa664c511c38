"""Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"), on device, off by default.

Per training batch one weight ``lam ~ Beta(alpha, alpha)`` and one permutation ``perm`` of the batch
(the paper's form): the model sees ``lam * x + (1 - lam) * x[perm]`` and is trained towards the soft
label ``lam * onehot(y) + (1 - lam) * onehot(y[perm])``. ``--mixup=ALPHA`` (``DataConfig.mixup``;
0: off). It acts on what the step feeds the model (after preprocessing and any ``--augment``), so it
mixes images, or feature vectors for a head on cached backbone outputs. :func:`mixup_params` draws
``lam`` and ``perm`` from a key; :func:`mix_inputs` and :func:`mix_labels` apply given ones
(deterministic; tested against NumPy); :func:`soft_cross_entropy` is the loss on soft labels, with optional per-class weights.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def mixup_params(rng: Array, n: int, alpha: float) -> Tuple[Array, Array]:
    """(lam: float32 scalar ~ Beta(alpha, alpha), perm: int32 (n,) a random permutation of the batch)."""
    k_lam, k_perm = jax.random.split(rng)
    lam = jax.random.beta(k_lam, alpha, alpha, (), jnp.float32)
    return lam, jax.random.permutation(k_perm, n).astype(jnp.int32)


def mix_inputs(x: Array, lam: Array, perm: Array) -> Array:
    """lam * x + (1 - lam) * x[perm] (computed in float32, returned in x's dtype)."""
    lam = jnp.asarray(lam, jnp.float32)
    xf = x.astype(jnp.float32)
    return (lam * xf + (1.0 - lam) * xf[perm]).astype(x.dtype)


def mix_labels(labels: Array, lam: Array, perm: Array, num_classes: int) -> Array:
    """float32 (n, num_classes) soft labels lam * onehot(y) + (1 - lam) * onehot(y[perm])."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)
    return lam * onehot + (1.0 - lam) * onehot[perm]


def soft_cross_entropy(logits: Array, targets: Array, weights: Optional[Array] = None) -> Array:
    """Per-example -sum_c t_c w_c log softmax(logits)_c (w = 1 without ``weights``); for one-hot
    targets it is the weighted cross-entropy ``w[y] * CE`` of :func:`lightflax.steps.weighted_cross_entropy`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    t = targets if weights is None else targets * weights[None, :]
    return -jnp.sum(t * logp, axis=-1)
