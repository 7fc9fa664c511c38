"""Composition used by the experiment files: flags -> data -> RunConfig -> train.

Experiments stay thin: they name a model and its arguments and call
:func:`run_training`; everything else is shared.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any, Dict, Optional

import jax
from absl import flags, logging

from lightflax import data as data_lib
from lightflax import models, train
from lightflax.errors import UserError  # noqa: F401  (re-exported for experiment files)

FLAGS = flags.FLAGS


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize from --coordinator_address/--num_processes/--process_id."""
    given = [FLAGS.coordinator_address is not None, FLAGS.num_processes is not None, FLAGS.process_id is not None]
    if not any(given):
        return
    if not all(given):
        raise UserError("multi-process runs need all of --coordinator_address, --num_processes and --process_id")
    if FLAGS.process_id >= FLAGS.num_processes:
        raise UserError(f"--process_id {FLAGS.process_id} must be < --num_processes {FLAGS.num_processes}")
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )


def default_workdir(experiment: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{experiment}-{stamp}")


def load_data(*, num_classes: Optional[int] = None, synthetic_shape=None, allow_fallback: bool = True,
              holdout: bool = True):
    """Loads --dataset; falls back to labelled synthetic data when the DEFAULT
    dataset is not found (an explicitly requested dataset must exist). ``holdout``:
    see ``lightflax.data.load``."""
    name = FLAGS.dataset
    explicit = FLAGS["dataset"].present
    kwargs = dict(data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir, seed=FLAGS.seed,
                  on_corrupt=FLAGS.on_corrupt, image_size=_stored_resolution(name, FLAGS.image_size), holdout=holdout)
    if name == "synthetic":
        return _synthetic(num_classes, synthetic_shape)
    try:
        return data_lib.load(name, **kwargs)
    except UserError as e:
        if explicit or not allow_fallback:
            raise
        msg = (f"{name} data not found ({str(e).splitlines()[0]}); running on SYNTHETIC data instead - the "
               f"results are labelled synthetic and say nothing about real accuracy")
        logging.warning(msg)
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)
        data = _synthetic(num_classes, synthetic_shape)
        data.notes.append(msg)
        return data


def _stored_resolution(name: str, image_size: int) -> Optional[int]:
    """chest_xray is stored at 64/128/224/299: the smallest one >= the model's input size."""
    if name != "chest_xray":
        return None
    for r in (64, 128, 224, 299):
        if image_size <= r:
            return r
    return 299


def _synthetic(num_classes, shape):
    n = FLAGS.synthetic_size
    return data_lib.load(
        "synthetic",
        synthetic_shape=shape,
        synthetic_sizes={"train": n, "val": max(1, n // 2), "test": max(1, n // 2)},
        num_classes=num_classes,
        seed=FLAGS.seed,
    )


def run_config(experiment: str, model: str, model_kwargs: Dict[str, Any], *, channels: int,
               uses_light: bool) -> train.RunConfig:
    from lightflax.data import augment as augment_lib

    l2 = FLAGS.l2 if FLAGS.l2 is not None else (1e-4 if uses_light else 0.0)
    return train.RunConfig(
        workdir=FLAGS.workdir or default_workdir(experiment),
        model=model,
        model_kwargs=model_kwargs,
        experiment=experiment,
        batch_size=FLAGS.batch_size,
        epochs=FLAGS.epochs,
        learning_rate=FLAGS.learning_rate,
        l2=l2,
        seed=FLAGS.seed,
        num_seeds=FLAGS.num_seeds,
        replica_mode=FLAGS.replica_mode,
        parallel=FLAGS.parallel,
        dtype=FLAGS.dtype,
        image_size=FLAGS.image_size,
        channels=channels,
        augment=augment_lib.AugmentConfig.study() if FLAGS.augment == "study" else None,
        eval_image_size=FLAGS.eval_image_size,
        select_split=FLAGS.select_split,
        early_stopping_patience=FLAGS.early_stopping_patience,
        reduce_lr_patience=FLAGS.reduce_lr_patience,
        reduce_lr_factor=FLAGS.reduce_lr_factor,
        steps_per_epoch=FLAGS.steps_per_epoch,
        profile_dir=FLAGS.profile_dir,
        profile_start_step=FLAGS.profile_start_step,
        profile_steps=FLAGS.profile_steps,
        resume=FLAGS.resume,
        flags=dict(FLAGS.flag_values_dict(), experiment=experiment),
    )


def run_training(experiment: str, model: str, model_kwargs: Dict[str, Any], *, channels: int,
                 stored_channels: int = 1, num_classes: Optional[int] = None, workdir: Optional[str] = None,
                 data=None, init_variables=None, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The whole run of a training experiment; returns results.json's content.

    ``init_variables`` replaces the random initialisation (fine-tuning);
    ``overrides`` sets RunConfig fields after the flags (e.g. a second stage's
    epochs and learning rate)."""
    maybe_initialize_distributed()
    meta = models.info(model)
    if data is None:
        data = load_data(num_classes=num_classes or meta.num_classes,
                         synthetic_shape=(FLAGS.image_size, FLAGS.image_size, stored_channels))
    if FLAGS.mean_subtraction:
        mean = data.splits["train"].images.reshape(-1, data.splits["train"].images.shape[-1]).mean(0) / 255.0
    else:
        mean = None
    uses_light = "light" in model
    kwargs = dict(model_kwargs)
    if FLAGS.impl is not None:
        kwargs["impl"] = FLAGS.impl
    if FLAGS.dropout:
        kwargs["dropout"] = FLAGS.dropout
    cfg = run_config(experiment, model, kwargs, channels=channels, uses_light=uses_light)
    if workdir:
        cfg.workdir = workdir
    for name, value in (overrides or {}).items():
        setattr(cfg, name, value)
    if mean is not None:
        mean = tuple(float(m) for m in mean)
        cfg.mean = mean * channels if len(mean) == 1 and channels > 1 else mean
    if data.synthetic:
        print("NOTE: training on SYNTHETIC data (random images); accuracy figures are meaningless.", flush=True)
    print(f"{experiment}: model {model} {model_kwargs}, dataset {data.name} "
          f"({'synthetic' if data.synthetic else data.source}), workdir {cfg.workdir}", flush=True)
    results = train.train_and_evaluate(cfg, data, init_variables=init_variables)
    print(f"wrote {os.path.join(cfg.workdir, 'results.json')}: test_accuracy={results.get('test_accuracy')} "
          f"{cfg.select_split}_accuracy={results['select_metrics'].get('accuracy')} "
          f"time_per_epoch_s={results.get('time_per_epoch_s')}", flush=True)
    return results


# ----------------------------------------------------------------------------
# The LightLayers paper's experiments (MNIST, Fashion-MNIST, CIFAR)
# ----------------------------------------------------------------------------


def define_paper_flags(**defaults) -> None:
    """--method and --k for the paper's experiments, plus their protocol defaults."""
    from lightflax import flags as common

    flags.DEFINE_enum("method", "light", ["conv2d", "separable", "light"], "Convolution of the model.")
    flags.DEFINE_integer("k", 1, "LightLayers rank K (--method=light).", lower_bound=1)
    flags.DEFINE_boolean("paper_protocol", False, "The paper's own protocol: train on the whole official training "
                         "set in stored order (no hold-out, no shuffling) and select the checkpoint, drive "
                         "ReduceLROnPlateau and EarlyStopping on the TEST split (optimistic test figures).")
    common.set_defaults(**defaults)


def run_paper(experiment: str, *, family: str, channels: int, num_classes: int) -> Dict[str, Any]:
    method = FLAGS.method
    model = f"{family}_{method}"
    kwargs = {"k": FLAGS.k} if method == "light" else {}
    if method != "light" and FLAGS["k"].present:
        raise UserError(f"--k applies to --method=light only (got --method={method})")
    if not FLAGS.paper_protocol:
        return run_training(experiment, model, kwargs, channels=channels, stored_channels=channels,
                            num_classes=num_classes)
    if FLAGS["select_split"].present and FLAGS.select_split != "test":
        raise UserError(f"--paper_protocol selects on the test split; drop --select_split={FLAGS.select_split}")
    data = load_data(num_classes=num_classes, synthetic_shape=(FLAGS.image_size, FLAGS.image_size, channels),
                     holdout=False)
    data.notes.append("paper protocol (--paper_protocol): no shuffling; checkpoint selection, ReduceLROnPlateau "
                      "and EarlyStopping on the TEST split, so the test figures are optimistic, as the paper's")
    return run_training(experiment, model, kwargs, channels=channels, stored_channels=channels,
                        num_classes=num_classes, data=data, overrides={"select_split": "test", "shuffle": False})

