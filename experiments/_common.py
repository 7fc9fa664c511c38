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

import contextlib
import dataclasses
import os
import shutil
from typing import Any, Dict, Optional, Tuple

from absl import flags

from experiments import default_workdir
from lightflax import data as data_lib, models, parallel, progress, train
from lightflax.config import RunConfig
from lightflax.data import DATASETS, pipeline
from lightflax.errors import UserError

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Run directory (checkpoints, results.json, history.csv, curves.png, "
                    "TensorBoard events). Default: runs/<experiment>-k<K>-<size>px-<UTC time>.")
flags.DEFINE_enum("dataset", "chest_xray", list(DATASETS), "Dataset to train on. X-ray experiments: "
                  "without --dataset/--manual_dir/--data_dir and without the study's chest_xray folders, the "
                  "real PneumoniaMNIST X-rays embedded in the package; synthetic only when asked for.")
flags.DEFINE_string("data_dir", None, "Folder of prepared data / downloaded files (or an npz for pneumonia_mnist).")
flags.DEFINE_string("manual_dir", None, "Folder holding chest_xray/ (or chest_xray/ itself) for --dataset=chest_xray.")
flags.DEFINE_integer("image_size", 299, "Model input resolution (images are resized on device). Default: 299 "
                     "on chest_xray (the study's); on PneumoniaMNIST a size that fits each model (28, or 64 for "
                     "Conv2D).", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Global batch size (split across devices).", lower_bound=1)
flags.DEFINE_integer("epochs", 20, "Training epochs.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.", lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "Random seed (initialisation and data order).")
flags.DEFINE_boolean("resume", False, "Continue the run in --workdir exactly where it stopped.")
flags.DEFINE_boolean("profile", False, "Write a JAX profiler trace of a window of training steps into the "
                     "workdir (TensorBoard's Profile tab: tensorboard --logdir runs/).")
flags.DEFINE_string("profile_dir", None, "Write the profiler trace here instead of the workdir (implies --profile).")
flags.DEFINE_enum("progress", "auto", ["auto", "bars", "epochs", "quiet"], "Console progress: auto (a per-step "
                  "bar with steps/s, ETA and running loss when stdout is a terminal, else one line per epoch), "
                  "bars, epochs (one line per epoch), quiet (no epoch lines). --verbosity=-1 (or lower) without "
                  "--progress means epochs, -2 or lower quiet.")
flags.DEFINE_integer("profile_start_step", 3, "First profiled step (after warm-up).", lower_bound=0)
flags.DEFINE_integer("profile_steps", 3, "Number of profiled steps.", lower_bound=1)
flags.DEFINE_integer("num_seeds", 1, "Independently initialised replicas (seeds seed..seed+N-1) trained together "
                     "in one compiled step (see --replica_mode).", lower_bound=1)
flags.DEFINE_enum("replica_mode", "vmap", ["vmap", "loop"], "How --num_seeds replicas share one compiled step: "
                  "vmap (vectorised) or loop (one after the other, unrolled; plain convolutions, faster on CPU).")
flags.DEFINE_enum("parallel", "shard_map", ["shard_map", "pmap"], "Data-parallel wrapper of the shared step.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
flags.DEFINE_enum("kernels", "native", ["native", "xla"], "CPU kernels for convolution, BatchNorm and max "
                  "pooling: native (default: oneDNN through XLA FFI where the library was built, else XLA's, "
                  "said in the log and results.json; 1.4-1.9x faster steps, see docs/native.md) or xla. "
                  "GPUs/TPUs always use XLA's.")
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
flags.DEFINE_enum("class_weighting", "none", ["none", "balanced"], "Per-example loss weights: none, or balanced "
                  "(n / (classes * n_c) from the training split's labels).")
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"], "Learning-rate schedule: constant (with "
                  "--reduce_lr_patience if given) or cosine (decay to 0 over the run's steps, per step).")
flags.DEFINE_integer("warmup_epochs", 0, "Linear learning-rate warm-up epochs before the cosine decay "
                     "(--lr_schedule=cosine).", lower_bound=0)
flags.DEFINE_enum("decision", "argmax", ["argmax", "prior_corrected"], "Decision rule reported (two classes): "
                  "argmax (0.5 threshold), or prior_corrected (threshold moved from the training split's class "
                  "prior to the expected test prior; the 0.5 figures are reported too).")
flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (smoke runs).", lower_bound=1)
flags.DEFINE_integer("synthetic_size", 128, "Training examples of synthetic data (val/test get half).",
                     lower_bound=1)
flags.DEFINE_enum("on_corrupt", "skip", ["skip", "fail"], "Corrupt images when preparing data: skip (and "
                  "report) or fail.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs "
                    "(jax.distributed.initialize).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.", lower_bound=0)


# ----------------------------------------------------------------------------
# --recipe: one name for a set of flag values (xray_light, xray_conv2d, xray_transfer)
# ----------------------------------------------------------------------------

# recipe -> {flag: value}. "study" is today's defaults (the seed study's protocol); "robust" is
# meant to generalise to a shifted test set: an ensemble of 3 replicas, a cosine learning-rate
# decay (a settled final model instead of a noisy best-validation-loss epoch) and the decision
# moved to the test split's published class balance. Chosen by the 3-seed ablations in
# docs/robust.md (validation split, class-balance and acquisition-shift proxies); the study's
# augmentation, dropout 0.25 and a class-balanced loss were measured there and not taken.
RECIPES: Dict[str, Dict[str, Any]] = {
    "study": {"augment": "none", "dropout": 0.0, "class_weighting": "none", "lr_schedule": "constant",
              "epochs": 20, "num_seeds": 1, "decision": "argmax"},
    "robust": {"augment": "none", "dropout": 0.0, "class_weighting": "none", "lr_schedule": "cosine",
               "epochs": 20, "num_seeds": 3, "decision": "prior_corrected"},
}
# (recipe, experiment) -> {flag: value}: where one experiment needs another value for the same
# principle. A linear head on cached backbone features costs ~0.3 s per epoch and had not
# converged at 20 (its best epoch was one of the last three in 6 of 6 replicas), so robust trains it
# for 100 epochs, to convergence (docs/robust.md, "Transfer learning").
RECIPE_ADJUSTMENTS: Dict[Tuple[str, str], Dict[str, Any]] = {("robust", "xray_transfer"): {"epochs": 100}}
RECIPE_EXPERIMENTS = ("xray_light", "xray_conv2d", "xray_transfer")


def recipe_values(name: str, experiment: str) -> Dict[str, Any]:
    """The flag values of recipe ``name`` for ``experiment`` (RECIPES with RECIPE_ADJUSTMENTS)."""
    return {**RECIPES[name], **RECIPE_ADJUSTMENTS.get((name, experiment), {})}
_applied_recipe: Dict[str, Any] = {}  # what apply_recipe did (results.json), empty before


def define_recipe_flag() -> None:
    """--recipe, for the experiments that take it (each calls this at import; idempotent)."""
    if "recipe" not in FLAGS:
        flags.DEFINE_enum("recipe", "study", list(RECIPES), "A set of flag values: study (the seed study's "
                          "protocol, the default) or robust (for a test set whose class balance and images differ "
                          "from training: " + ", ".join(f"--{k}={v}" for k, v in RECIPES["robust"].items()) +
                          "; xray_transfer: --epochs=100). Flags given on the command line override the recipe's "
                          "values.")


def apply_recipe(experiment: str, skip: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Sets the flags of --recipe that the command line did not give (an explicit flag wins) and
    returns what results.json records: ``recipe`` (the name), ``recipe_values`` (the effective value
    of every flag the recipe names, overrides included), ``recipe_overrides`` (the flags given
    explicitly instead) and ``recipe_skipped`` ({flag: why} for the knobs that do not apply to this
    experiment, left at their flag value). Call it first in ``main``, before any flag is read."""
    if experiment not in RECIPE_EXPERIMENTS:
        raise UserError(f"--recipe applies to {', '.join(RECIPE_EXPERIMENTS)}, not {experiment}")
    name, skip = FLAGS.recipe, dict(skip or {})
    values = recipe_values(name, experiment)
    overrides = {}
    for flag, value in values.items():
        if flag in skip:
            continue
        if FLAGS[flag].present:
            overrides[flag] = FLAGS[flag].value
        else:
            FLAGS[flag].value = value
    for flag, why in skip.items():
        if name != "study":
            print(f"--recipe={name}: --{flag}={values[flag]} skipped for {experiment}: {why}", flush=True)
    _applied_recipe.clear()
    _applied_recipe.update(recipe=name, recipe_values={f: FLAGS[f].value for f in values},
                           recipe_overrides=overrides, recipe_skipped=skip)
    return dict(_applied_recipe)


def check_recipe_applied() -> None:
    """An explicit --recipe that no apply_recipe consumed (xray_compare defines the flag through
    xray_transfer) stops the run instead of being ignored."""
    if "recipe" in FLAGS and FLAGS["recipe"].present and not _applied_recipe:
        raise UserError(f"--recipe applies to {', '.join(RECIPE_EXPERIMENTS)} only; drop --recipe")


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
    """results.json's ``flags`` entry: the experiment's own and the common flags (absl's logging
    flags left out), as the command line set them."""
    ours = {}
    for module, module_flags in FLAGS.flags_by_module_dict().items():
        if module.split(".")[0] in ("experiments", "launch") or module == "__main__":
            ours.update({f.name: f.value for f in module_flags})
    return {"flags": dict(ours, experiment=experiment), **_applied_recipe}


# The X-ray experiments' default when the study's Kaggle folders are absent: the real
# PneumoniaMNIST X-rays embedded in the package (synthetic data only on --dataset=synthetic).
XRAY_DEFAULT = "chest_xray"
XRAY_EMBEDDED = "pneumonia_mnist"
STANDARD_SIZES = (64, 128, 224, 299)


def explicit_data_choice() -> bool:
    """--dataset, --data_dir or --manual_dir on the command line: the user chose the data."""
    return any(FLAGS[name].present for name in ("dataset", "data_dir", "manual_dir"))


def resolve_dataset() -> Tuple[str, Optional[str]]:
    """(dataset name, the one console line saying why) after the up-front checks: the X-ray
    experiments' default chest_xray becomes the embedded real PneumoniaMNIST when its folders
    are not found; an explicit choice must be present (UserError otherwise)."""
    name = FLAGS.dataset
    if FLAGS.manual_dir is not None and name != "chest_xray":
        raise UserError(f"--manual_dir applies to --dataset=chest_xray only (got --dataset={name}); "
                        f"use --data_dir for {name}")
    if name == "synthetic":
        return name, None
    if name == XRAY_DEFAULT and not explicit_data_choice() and not data_lib.available(name):
        return XRAY_EMBEDDED, (
            "data: no chest_xray folder found (pass --manual_dir=FOLDER for the study's Kaggle images); "
            "training on the embedded real PneumoniaMNIST chest X-rays (28x28, MedMNIST v2, train 4,708 / "
            "val 524, no test split)")
    given = [f"--{n}={FLAGS[n].value}" for n in ("data_dir", "manual_dir") if FLAGS[n].present]
    if given and not data_lib.available(name, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir):
        if name == "chest_xray" and FLAGS.data_dir and not FLAGS.manual_dir:
            return name, None  # a prepared copy in --data_dir: load() checks it
        raise UserError(f"{' '.join(given)} holds no {name} data; pass the folder that holds it "
                        f"(see README, Data) or leave the flag out")
    return name, None


def fitting_image_size(model: str, model_kwargs: Dict[str, Any], dataset: str) -> int:
    """--image_size when given (or when the data is the study's chest_xray); otherwise, for the
    small stored datasets, their stored size if the model takes it, else the smallest standard size
    (64, 128, ...) that it takes: 28 for LightLayers, 64 for Conv2D on PneumoniaMNIST."""
    if FLAGS["image_size"].present or dataset != XRAY_EMBEDDED:
        return FLAGS.image_size
    need = min_input_size(model, model_kwargs)
    return 28 if need <= 28 else next((s for s in STANDARD_SIZES if s >= need), STANDARD_SIZES[-1])


def min_input_size(model: str, model_kwargs: Dict[str, Any]) -> int:
    return models.create(model, num_classes=models.info(model).num_classes or 2, **model_kwargs).min_input_size()


def check_image_size(label: str, model: str, model_kwargs: Dict[str, Any], size: int) -> None:
    """A row's input size, checked before any data preparation or training."""
    need = min_input_size(model, model_kwargs)
    if size < need:
        raise UserError(f"--image_size={size} is too small for {label} ({model}): it needs at least "
                        f"{need}x{need}; pass --image_size={next(s for s in STANDARD_SIZES if s >= need)} "
                        f"or leave --image_size out (each row then gets a size that fits)")


def check_workdir(path: str) -> None:
    """The run folder: not an existing file, not a finished or running run unless --resume, and
    creatable (its nearest existing parent is a writable folder). Nothing is created here."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--workdir {path} is an existing file; choose a folder")
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.listdir(os.path.join(path, "checkpoints")) \
            and not FLAGS.resume:
        raise UserError(f"--workdir {path} already holds a run; pass --resume to continue it or choose "
                        f"another --workdir")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--workdir {path} cannot be created ({parent} is not a writable folder); "
                        f"choose a writable folder")


@contextlib.contextmanager
def no_empty_folder_on_error(path: str):
    """Removes ``path`` again when the block fails and it holds nothing but the run lock (and empty
    folders): an early error leaves no empty run folder behind."""
    existed = os.path.exists(path)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(path):
            leftovers = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
            if all(os.path.basename(f) == ".lock" for f in leftovers):
                shutil.rmtree(path, ignore_errors=True)
        raise


def load_data(*, num_classes: Optional[int] = None, synthetic_shape=None, holdout: bool = True,
              name: Optional[str] = None, note: Optional[str] = None):
    """Loads the dataset ``name`` (default: :func:`resolve_dataset`'s); ``note`` is printed once
    and recorded in the data's notes (results.json). ``holdout``: see ``lightflax.data.load``."""
    if name is None:
        name, note = resolve_dataset()
    if name == "synthetic":
        return _synthetic(num_classes, synthetic_shape)
    with progress.task(f"loading {name}"):
        data = data_lib.load(name, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir, seed=FLAGS.seed,
                             on_corrupt=FLAGS.on_corrupt, stored_size=_stored_resolution(name, FLAGS.image_size),
                             holdout=holdout)
    if note:
        print(note, flush=True)
        data.notes.insert(0, note)
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
    """The run's one RunConfig from the flags (``fields`` override flag values, e.g. the paper protocol's).
    ``data`` may be None (the mean of --mean_subtraction is then added after loading)."""
    check_recipe_applied()
    kwargs = dict(model_kwargs)
    if FLAGS.impl is not None:
        kwargs["impl"] = FLAGS.impl
    if FLAGS.dropout:
        kwargs["dropout"] = FLAGS.dropout
    workdir = workdir or FLAGS.workdir or default_workdir(experiment, run_tags(model_kwargs, FLAGS.image_size))
    values = dict(
        workdir=workdir, model=model, model_kwargs=kwargs, experiment=experiment, channels=channels,
        mean=_mean(data, channels) if data is not None else None,
        l2=FLAGS.l2 if FLAGS.l2 is not None else models.info(model).reference_l2,
    )
    for name in ("batch_size", "epochs", "learning_rate", "seed", "num_seeds", "replica_mode", "parallel", "dtype",
                 "image_size", "augment", "eval_image_size", "select_split", "early_stopping_patience",
                 "reduce_lr_patience", "reduce_lr_factor", "steps_per_epoch", "profile_dir", "profile_start_step",
                 "profile_steps", "resume", "kernels", "class_weighting", "lr_schedule", "warmup_epochs",
                 "decision"):
        values[name] = FLAGS[name].value
    if FLAGS.profile and not FLAGS.profile_dir:
        values["profile_dir"] = workdir  # the trace lands next to the TensorBoard scalars
    values.update(fields)
    return RunConfig(**values)


def run_tags(model_kwargs: Dict[str, Any], image_size: Optional[int]) -> list:
    """What varies between runs, for the default run folder name: k5, 28px."""
    tags = [f"k{model_kwargs['k']}"] if "k" in model_kwargs else []
    return tags + ([f"{image_size}px"] if image_size else [])


def configure_output() -> None:
    """--progress (or --verbosity) -> lightflax.progress's mode."""
    mode = FLAGS.progress
    if not FLAGS["progress"].present and FLAGS["verbosity"].present and FLAGS.verbosity < 0:
        mode = "epochs" if FLAGS.verbosity == -1 else "quiet"
    progress.set_mode(mode)
    if not progress.bars_enabled():  # TFDS's own preparation bars (chest_xray) follow the same rule
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()


def run_training(experiment: str, model: str, model_kwargs: Dict[str, Any], *, channels: int,
                 stored_channels: int = 1, num_classes: Optional[int] = None, workdir: Optional[str] = None,
                 data=None, label: Optional[str] = None, **fields) -> Dict[str, Any]:
    """The whole run of a training experiment; returns results.json's content. Every flag, the
    input size, the workdir and the data's presence are checked before any data preparation or
    training; an early error leaves no run folder."""
    initialize_distributed()
    configure_output()
    name, note = (data.name, None) if data is not None else resolve_dataset()
    size = fields.pop("image_size", None) or fitting_image_size(model, model_kwargs, name)
    check_image_size(label or model, model, model_kwargs, size)
    workdir = workdir or FLAGS.workdir or default_workdir(experiment, run_tags(model_kwargs, size))
    check_workdir(workdir)
    cfg = build_config(experiment, model, model_kwargs, None, channels=channels, workdir=workdir,
                       image_size=size, **fields)
    if data is None:
        data = load_data(num_classes=num_classes or models.info(model).num_classes,
                         synthetic_shape=(size, size, stored_channels), name=name, note=note)
    if FLAGS.mean_subtraction:
        cfg = dataclasses.replace(cfg, mean=_mean(data, channels))
    extra = flags_record(experiment)
    if note:
        extra["data_default"] = note
    with no_empty_folder_on_error(workdir):
        return train.train_and_evaluate(cfg, data, extra=extra)


# ----------------------------------------------------------------------------
# The LightLayers paper's experiments (MNIST, Fashion-MNIST, CIFAR)
# ----------------------------------------------------------------------------


def define_paper_flags(**defaults) -> None:
    """--method, --k and --paper_protocol for the paper's experiments, plus their protocol defaults."""
    flags.DEFINE_enum("method", "light", ["conv2d", "separable", "light"], "Convolution of the model.")
    flags.DEFINE_integer("k", 1, "LightLayers rank K (--method=light).", lower_bound=1)
    flags.DEFINE_boolean("paper_protocol", False, "The paper's own protocol: train on the whole official training "
                         "set in stored order (no hold-out, no shuffling), drive ReduceLROnPlateau and "
                         "EarlyStopping on the TEST split and report the LAST epoch's weights (the reference's "
                         "ModelCheckpoint keeps every epoch, no save_best_only).")
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
    data.notes.append("paper protocol (--paper_protocol): no shuffling; ReduceLROnPlateau and EarlyStopping on "
                      "the TEST split (they see the test loss, as the paper's callbacks did); the reported and "
                      "exported weights are the LAST epoch's (the reference's ModelCheckpoint has no "
                      "save_best_only), not the best test epoch")
    return run_training(experiment, model, kwargs, channels=channels, stored_channels=channels,
                        num_classes=num_classes, data=data, select_split="test", shuffle=False, keep="last")

