"""The entry layer's shared part: the common flags, and flags -> data -> RunConfig -> train.

Flags are defined and read only here and in the experiment files (absl flags are
global); the library (``lightflax``) takes one frozen :class:`lightflax.config.RunConfig`
built once by :func:`build_config`. Experiments import this module, define their
own flags (``--k``, ``--method``, ...) and may change defaults with
:func:`set_defaults`. External checks use these names: --workdir --dataset
--data_dir --manual_dir --image_size --batch_size --epochs --learning_rate --seed
--resume --profile_dir.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

from absl import flags, logging

from experiments import default_workdir
from lightflax import data as data_lib, models, parallel, train
from lightflax.config import RunConfig
from lightflax.data import DATASETS, pipeline
from lightflax.errors import UserError

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Run directory (checkpoints, results.json, history.csv, curves.png). "
                    "Default: runs/<experiment>-<UTC time>.")
flags.DEFINE_enum("dataset", "chest_xray", list(DATASETS), "Dataset to train on.")
flags.DEFINE_string("data_dir", None, "Folder of prepared data / downloaded files (or an npz for pneumonia_mnist).")
flags.DEFINE_string("manual_dir", None, "Folder holding chest_xray/ (or chest_xray/ itself) for --dataset=chest_xray.")
flags.DEFINE_integer("image_size", 299, "Model input resolution (images are resized on device).", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Global batch size (split across devices).", lower_bound=1)
flags.DEFINE_integer("epochs", 20, "Training epochs.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.", lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "Random seed (initialisation and data order).")
flags.DEFINE_boolean("resume", False, "Continue the run in --workdir exactly where it stopped.")
flags.DEFINE_string("profile_dir", None, "Write a JAX profiler trace of a window of training steps here.")
flags.DEFINE_integer("profile_start_step", 3, "First profiled step (after warm-up).", lower_bound=0)
flags.DEFINE_integer("profile_steps", 3, "Number of profiled steps.", lower_bound=1)
flags.DEFINE_integer("num_seeds", 1, "Independently initialised replicas (seeds seed..seed+N-1) trained together "
                     "in one compiled step (see --replica_mode).", lower_bound=1)
flags.DEFINE_enum("replica_mode", "vmap", ["vmap", "loop"], "How --num_seeds replicas share one compiled step: "
                  "vmap (vectorised) or loop (one after the other, unrolled; plain convolutions, faster on CPU).")
flags.DEFINE_enum("parallel", "shard_map", ["shard_map", "pmap"], "Data-parallel wrapper of the shared step.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
flags.DEFINE_enum("impl", None, ["conv", "einsum"], "LightConv2D/Conv2D implementation: conv (XLA's "
                  "convolution, the default) or einsum (patches + one GEMM).")
flags.DEFINE_float("l2", None, "L2 penalty on LightConv2D kernels (default: the reference's 1e-4 for "
                   "LightLayers models, 0 otherwise).", lower_bound=0.0)
flags.DEFINE_float("dropout", 0.0, "Dropout before the head (the study tried 0.25).", lower_bound=0.0, upper_bound=0.99)
flags.DEFINE_enum("augment", "none", ["none", "study"], "On-device augmentation (study = its ImageDataGenerator).")
flags.DEFINE_boolean("mean_subtraction", False, "Subtract the training split's per-channel mean on device.")
flags.DEFINE_integer("eval_image_size", None, "Evaluate at this resolution (FixRes; models ending in global "
                     "pooling).", lower_bound=1)
flags.DEFINE_enum("select_split", "val", ["val", "test"], "Split on which the best checkpoint is chosen.")
flags.DEFINE_integer("early_stopping_patience", 0, "Stop after this many epochs without val-loss improvement "
                     "(0: off).", lower_bound=0)
flags.DEFINE_integer("reduce_lr_patience", 0, "Reduce the learning rate after this many epochs without "
                     "improvement (0: off).", lower_bound=0)
flags.DEFINE_float("reduce_lr_factor", 0.1, "Factor of reduce-LR-on-plateau.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (smoke runs).", lower_bound=1)
flags.DEFINE_integer("synthetic_size", 128, "Training examples of synthetic data (val/test get half).",
                     lower_bound=1)
flags.DEFINE_enum("on_corrupt", "skip", ["skip", "fail"], "Corrupt images when preparing data: skip (and "
                  "report) or fail.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs "
                    "(jax.distributed.initialize).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.", lower_bound=0)


def set_defaults(**defaults) -> None:
    """Changes common defaults for one experiment (before flags are parsed)."""
    for name, value in defaults.items():
        FLAGS.set_default(name, value)


# ----------------------------------------------------------------------------
# flags -> data -> RunConfig -> train
# ----------------------------------------------------------------------------


def initialize_distributed() -> None:
    """jax.distributed.initialize from --coordinator_address/--num_processes/--process_id."""
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def flags_record(experiment: str) -> Dict[str, Any]:
    """results.json's ``flags`` entry: every flag's value, as the command line set it."""
    return {"flags": dict(FLAGS.flag_values_dict(), experiment=experiment)}


def load_data(*, num_classes: Optional[int] = None, synthetic_shape=None, allow_fallback: bool = True,
              holdout: bool = True):
    """Loads --dataset; falls back to labelled synthetic data when the DEFAULT
    dataset is not found (an explicitly requested dataset must exist). ``holdout``:
    see ``lightflax.data.load``."""
    name = FLAGS.dataset
    if name == "synthetic":
        return _synthetic(num_classes, synthetic_shape)
    try:
        return data_lib.load(name, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir, seed=FLAGS.seed,
                             on_corrupt=FLAGS.on_corrupt, stored_size=_stored_resolution(name, FLAGS.image_size),
                             holdout=holdout)
    except UserError as e:
        if FLAGS["dataset"].present or not allow_fallback:
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
    return next((r for r in (64, 128, 224, 299) if image_size <= r), 299)


def _synthetic(num_classes, shape):
    n = FLAGS.synthetic_size
    return data_lib.load("synthetic", synthetic_shape=shape,
                         synthetic_sizes={"train": n, "val": max(1, n // 2), "test": max(1, n // 2)},
                         num_classes=num_classes, seed=FLAGS.seed)


def _mean(data, channels: int):
    """--mean_subtraction: the training split's per-channel mean, one entry per model channel."""
    if not FLAGS.mean_subtraction:
        return None
    mean = pipeline.channel_mean(data.splits["train"].images)
    return mean * channels if len(mean) == 1 and channels > 1 else mean


def build_config(experiment: str, model: str, model_kwargs: Dict[str, Any], data, *, channels: int,
                 workdir: Optional[str] = None, **fields) -> RunConfig:
    """The run's one RunConfig from the flags (``fields`` override flag values, e.g. the paper protocol's)."""
    kwargs = dict(model_kwargs)
    if FLAGS.impl is not None:
        kwargs["impl"] = FLAGS.impl
    if FLAGS.dropout:
        kwargs["dropout"] = FLAGS.dropout
    values = dict(
        workdir=workdir or FLAGS.workdir or default_workdir(experiment), model=model, model_kwargs=kwargs,
        experiment=experiment, channels=channels, mean=_mean(data, channels),
        l2=FLAGS.l2 if FLAGS.l2 is not None else models.info(model).reference_l2,
    )
    for name in ("batch_size", "epochs", "learning_rate", "seed", "num_seeds", "replica_mode", "parallel", "dtype",
                 "image_size", "augment", "eval_image_size", "select_split", "early_stopping_patience",
                 "reduce_lr_patience", "reduce_lr_factor", "steps_per_epoch", "profile_dir", "profile_start_step",
                 "profile_steps", "resume"):
        values[name] = FLAGS[name].value
    values.update(fields)
    return RunConfig(**values)


def run_training(experiment: str, model: str, model_kwargs: Dict[str, Any], *, channels: int,
                 stored_channels: int = 1, num_classes: Optional[int] = None, workdir: Optional[str] = None,
                 data=None, **fields) -> Dict[str, Any]:
    """The whole run of a training experiment; returns results.json's content."""
    initialize_distributed()
    if data is None:
        data = load_data(num_classes=num_classes or models.info(model).num_classes,
                         synthetic_shape=(FLAGS.image_size, FLAGS.image_size, stored_channels))
    cfg = build_config(experiment, model, model_kwargs, data, channels=channels, workdir=workdir, **fields)
    return train.train_and_evaluate(cfg, data, extra=flags_record(experiment))


# ----------------------------------------------------------------------------
# The LightLayers paper's experiments (MNIST, Fashion-MNIST, CIFAR)
# ----------------------------------------------------------------------------


def define_paper_flags(**defaults) -> None:
    """--method, --k and --paper_protocol for the paper's experiments, plus their protocol defaults."""
    flags.DEFINE_enum("method", "light", ["conv2d", "separable", "light"], "Convolution of the model.")
    flags.DEFINE_integer("k", 1, "LightLayers rank K (--method=light).", lower_bound=1)
    flags.DEFINE_boolean("paper_protocol", False, "The paper's own protocol: train on the whole official training "
                         "set in stored order (no hold-out, no shuffling) and select the checkpoint, drive "
                         "ReduceLROnPlateau and EarlyStopping on the TEST split (optimistic test figures).")
    set_defaults(**defaults)


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
                        num_classes=num_classes, data=data, select_split="test", shuffle=False)

