"""Flags common to every training experiment, defined once (absl flags are global).

Experiments import this module, define their own flags (``--k``, ``--method``,
...) and may change defaults with :func:`set_defaults`. External checks use
these names: --workdir --dataset --data_dir --manual_dir --image_size
--batch_size --epochs --learning_rate --seed --resume --profile_dir.
"""

from __future__ import annotations

from absl import flags

from lightflax.data import DATASETS

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
flags.DEFINE_string("impl", None, "LightConv2D/Conv2D implementation: conv or einsum (default: per backend).")
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
