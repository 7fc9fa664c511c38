"""The shared training and evaluation steps (per device, per replica).

Every experiment uses these two functions. A step reads its batch straight
from the device-resident dataset (uint8), so nothing is copied from the host
per step: each device gathers its own slice of the epoch's permutation,
preprocesses it (resize, gray->RGB, /255, mean subtraction) and optionally
augments it on device, then computes gradients. Gradients, metrics and
BatchNorm batch statistics are averaged over ``parallel.AXIS``.

Every state, key and output carries a leading replica axis (``num_seeds``
independent initialisations and data orders trained in one step), also for a
single seed: :func:`over_seeds` adds it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax import lax

from lightflax import layers, parallel
from lightflax.config import REPLICA_MODES, RunConfig
from lightflax.data import augment as augment_lib, mixup as mixup_lib, pipeline

Array = jax.Array


class TrainState(train_state.TrainState):
    """Flax TrainState plus BatchNorm statistics."""

    batch_stats: Any = None


def preprocess(images: Array, size: Optional[int], cfg: RunConfig) -> Array:
    """uint8 NHWC images -> model input; feature vectors (B, D) and float images
    (already preprocessed, as in the input-path benchmark) pass through."""
    if images.ndim == 2 or jnp.issubdtype(images.dtype, jnp.floating):
        return images.astype(jnp.float32)
    return pipeline.preprocess(images, out_size=size, channels=cfg.channels, mean=cfg.mean)


def learning_rate_schedule(cfg: RunConfig, steps_per_epoch: int):
    """The learning rate of ``cfg``: the float ``cfg.learning_rate`` (constant; reduce-LR-on-plateau
    may change it per epoch), or with ``lr_schedule="cosine"`` an optax schedule of the global step t
    over T = epochs * steps_per_epoch steps, W = warmup_epochs * steps_per_epoch warm-up steps:
    lr * t / W for t < W, then lr * (1 + cos(pi * (t - W) / (T - W))) / 2, reaching 0 at t = T.
    The optimiser evaluates it at its own step count (``opt_state``), so it survives --resume."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if warmup == 0:
        return optax.cosine_decay_schedule(cfg.learning_rate, decay_steps=total, alpha=0.0)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup_steps=warmup, decay_steps=total,
                                              end_value=0.0)


def class_weights(labels, num_classes: int):
    """--class_weighting=balanced: float32 (num_classes,) weights n / (C * n_c) of the training
    labels (a class absent from them gets weight 0: it contributes no loss anyway)."""
    import numpy as np

    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)


def weighted_cross_entropy(logits: Array, labels: Array, weights: Array) -> Array:
    """The batch loss with per-class weights: mean_i w[y_i] * CE_i (NOT sum_i w CE / sum_i w).

    The mean of the weighted losses is an unbiased estimate of the class-balanced risk
    sum_c (1/C) E[CE | y=c] (E[w[y]] = 1 over the training split) with the same step size
    scale as the unweighted loss, and it is exactly additive over devices: the pmean of the
    devices' means is the global batch's mean. The ratio sum w CE / sum w is a biased ratio
    estimator whose normaliser changes per batch and per device (the pmean of per-device ratios
    is not the global ratio), which would make the multi-device run differ from one device."""
    return jnp.mean(weights[labels] * cross_entropy(logits, labels))


def make_optimizer(learning_rate, name: str = "adam") -> optax.GradientTransformation:
    """Adam (the study's and the paper's optimiser) with a mutable learning rate
    (``opt_state.hyperparams['learning_rate']``) for reduce-LR-on-plateau; ``learning_rate`` may
    be a schedule (:func:`learning_rate_schedule`), evaluated at every update."""
    if name == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
    if name == "sgd":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=0.9)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def create_state(model, tx, rng: Array, input_shape: Tuple[int, ...], init_variables=None) -> TrainState:
    """A fresh TrainState; ``init_variables`` (e.g. pretrained weights) replaces the random
    initialisation and must have exactly the model's variable structure and shapes."""
    def init():
        return model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)

    if init_variables is None:
        variables = init()
    else:
        from lightflax import checkpoints
        from lightflax.errors import CheckpointError

        shapes = jax.eval_shape(init)  # the structure only: no random initialisation to throw away
        expected = {c: shapes.get(c, {}) for c in ("params", "batch_stats")}
        given = {c: init_variables.get(c, {}) for c in ("params", "batch_stats")}
        problem = checkpoints.first_mismatch(checkpoints.leaf_specs(expected), checkpoints.leaf_specs(given))
        if problem:
            name = getattr(model, "model_name", model)
            raise CheckpointError(f"initial variables do not fit model {name}: {problem}")
        variables = jax.tree_util.tree_map(jnp.asarray, given)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
    )


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy on logits (the model has no softmax)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


MIXUP_STREAM = 0x6D6978  # fold_in constant of the mixup key ("mix")


def batch_loss(logits: Array, labels: Array, weights: Optional[Array], mix=None) -> Array:
    """The train step's loss: the mean cross-entropy, per-class weighted with ``weights``
    (:func:`weighted_cross_entropy`); with ``mix`` = mixup's (lam, perm), on its soft labels."""
    if mix is not None:
        targets = mixup_lib.mix_labels(labels, *mix, logits.shape[-1])
        return jnp.mean(mixup_lib.soft_cross_entropy(logits, targets, weights))
    if weights is None:
        return jnp.mean(cross_entropy(logits, labels))
    return weighted_cross_entropy(logits, labels, weights)


def make_train_step(model, cfg: RunConfig, local_batch: int, class_weights=None) -> Callable:
    """Per-device, per-replica train step.

    Args (of the returned function):
      state: TrainState (replicated).
      images, labels: the whole split on device, uint8 (N, H, W, C) and int32 (N,).
      perm: int32 (N,) this epoch's order; step: int32 index of the batch in the epoch.
      key: PRNG key of the replica (folded with the global step and device).
      dev_id: int32 (1,) this device's index (parallel.device_ids, sharded).
    Returns (state, metrics) with metrics {'loss', 'accuracy'} averaged over devices.
    ``class_weights``: (classes,) per-class loss weights (:func:`weighted_cross_entropy`; the
    reported loss is then the weighted one); None = the plain mean cross-entropy.
    ``cfg.mixup`` > 0: mixup (:mod:`lightflax.data.mixup`) of the device's batch after augmentation,
    the loss on the soft labels (weighted per class as above); accuracy against the unmixed labels.
    The device's slice of global batch ``step`` is local batch ``step * n_devices + dev``
    of :func:`lightflax.data.pipeline.get_batch` (global batch = n_devices * local_batch).
    """
    devices = cfg.batch_size // local_batch
    augment = augment_lib.from_name(cfg.augment)
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

    def step_fn(state: TrainState, images, labels, perm, step, key, dev_id):
        dev = dev_id[0]
        x, y = pipeline.get_batch(images, labels, perm, step * devices + dev, local_batch)
        x = preprocess(x, cfg.image_size, cfg)
        key = jax.random.fold_in(jax.random.fold_in(key, state.step), dev)
        aug_key, drop_key = jax.random.split(key)
        if augment is not None:
            x = augment_lib.augment(aug_key, x, augment)
        mix = None
        if cfg.mixup:  # its own key, so the other draws stay as without it
            mix = mixup_lib.mixup_params(jax.random.fold_in(key, MIXUP_STREAM), x.shape[0], cfg.mixup)
            x = mixup_lib.mix_inputs(x, *mix)

        def loss_fn(params):
            logits, new_vars = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": drop_key},
            )
            loss = batch_loss(logits, y, weights, mix)
            total = loss + (layers.reference_l2_penalty(params, cfg.l2) if cfg.l2 else 0.0)
            return total, (loss, logits, new_vars["batch_stats"])

        grads, (loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = lax.pmean(grads, parallel.AXIS)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32)),
        }
        metrics = lax.pmean(metrics, parallel.AXIS)
        state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        return state, metrics

    return step_fn


def make_eval_step(model, cfg: RunConfig, local_batch: int) -> Callable:
    """Per-device eval step over a fixed-size window of a split.

    Args: state, images, labels (the split on device), start (int32 offset of the
    global window), dev_id (int32 (1,), sharded). Returns per-example log-probabilities (local_batch, classes),
    labels and a validity mask (:func:`lightflax.data.pipeline.get_eval_batch`), sharded along the batch axis.
    """
    size = cfg.eval_image_size or cfg.image_size

    def eval_fn(state: TrainState, images, labels, start, dev_id):
        x, y, mask = pipeline.get_eval_batch(images, labels, start + dev_id[0] * local_batch, local_batch)
        x = preprocess(x, size, cfg)
        logits = state.apply_fn(
            {"params": state.params, "batch_stats": state.batch_stats}, x, train=False
        )
        return jax.nn.log_softmax(logits.astype(jnp.float32)), y, mask

    return eval_fn


def over_seeds(fn: Callable, num_seeds: int, in_axes, out_axes=0, mode: str = "vmap") -> Callable:
    """Apply ``fn`` over a leading replica axis of ``num_seeds`` (always present, also for 1).

    ``mode="vmap"`` batches the replicas (one program, replica axis vectorised: every
    convolution of per-replica kernels becomes a grouped convolution). ``mode="loop"``
    runs them one after the other inside the same compiled step, unrolled (N copies of
    the step in one program): the same numbers per replica as a plain run, and plain
    convolutions, which XLA:CPU runs much faster than grouped ones. (``lax.map``, a
    while loop, measured 3.5x slower than the unrolled form on XLA:CPU; compile time of
    the unrolled form grows with N.) One replica always takes the loop form: the plain
    step, with the axis added around it. ``in_axes`` entries are 0 (per replica) or None
    (shared); ``out_axes`` is 0 or a tuple of 0/None (None: identical for every replica,
    returned once).
    """
    if mode not in REPLICA_MODES:
        raise ValueError(f"replica mode must be one of {', '.join(REPLICA_MODES)}, got {mode!r}")
    if mode == "vmap" and num_seeds > 1:
        return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes)
    if any(a not in (0, None) for a in in_axes):
        raise ValueError(f"in_axes entries must be 0 or None, got {in_axes!r}")
    mapped = [i for i, a in enumerate(in_axes) if a == 0]

    def looped(*args):
        def one(per_replica):
            full = list(args)
            for i, value in zip(mapped, per_replica):
                full[i] = value
            return fn(*full)

        xs = tuple(args[i] for i in mapped)
        outs = [one(jax.tree_util.tree_map(lambda a, r=r: a[r], xs)) for r in range(num_seeds)]

        def gather(parts, axis):  # per replica: stacked; shared (None): replica 0's
            return jax.tree_util.tree_map(lambda *o: jnp.stack(o), *parts) if axis == 0 else parts[0]

        if not isinstance(out_axes, tuple):
            return gather(outs, out_axes)
        return tuple(gather([o[k] for o in outs], ax) for k, ax in enumerate(out_axes))

    return looped
