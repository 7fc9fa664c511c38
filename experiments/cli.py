"""The command line: one config flag (``--config``, ``configs/<experiment>.py``, overrides as
``--config.section.field=value``) and the short flags, each an alias of one config field.

:data:`ALIASES` is the one table of short flags: a flag exists for an experiment when its config
has the field; its type and default come from the config, its help and choices from here. absl
flags are global: only launch.py calls :func:`define` (once, for the one experiment it runs).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Dict, FrozenSet, Optional, Sequence, Tuple, Union

import ml_collections
from absl import flags
from ml_collections.config_flags import config_path

from lightflax import config as run_config

Choices = Union[Sequence[str], Callable[[], Sequence[str]], None]


@dataclasses.dataclass(frozen=True)
class Alias:
    flag: str
    path: str  # the config field, e.g. "schedule.epochs"
    help: str
    choices: Choices = None
    lower: Optional[float] = None
    upper: Optional[float] = None
    is_list: bool = False  # a comma-separated list (kept as one string in the config)
    only: Tuple[str, ...] = ()  # experiments that have the flag (default: every config with the field)


def _datasets():
    from lightflax.data import DATASETS

    return DATASETS


def _backbones():
    from lightflax import pretrained

    return pretrained.names()


def _recipes():
    from experiments import recipes

    return list(recipes.RECIPES)


def _layer_kinds():
    from lightflax import speed

    return speed.LAYER_KINDS


ALIASES: Tuple[Alias, ...] = (
    Alias("workdir", "workdir", "Run directory (checkpoints, results.json, history.csv, curves.png, TensorBoard "
          "events); predict: the finished run. Default: runs/<experiment>-<tags>-<UTC time>."),
    Alias("recipe", "recipe", "A set of values: study (the seed study's protocol, the default) or robust (for a "
          "test set whose class balance and images differ from training: --lr_schedule=cosine --num_seeds=3 "
          "--decision=prior_corrected; xray_transfer: --epochs=100) or shift (for images that differ from the "
          "training pool: robust plus the acquisition-shift ablations' choices, and predict's AdaBN by default; "
          "docs/robust.md). Flags given on the command line override "
          "the recipe's values (experiments/recipes.py).", _recipes),
    # model
    Alias("k", "model.k", "LightLayers rank K (--method=light).", lower=1),
    Alias("method", "model.method", "Convolution of the model.", ("conv2d", "separable", "light")),
    Alias("ks", "model.ks", "LightLayers ranks to compare.", is_list=True),
    Alias("impl", "model.impl", "LightConv2D/Conv2D implementation: conv (XLA's convolution, the default) or "
          "einsum (patches + one GEMM).", ("conv", "einsum")),
    Alias("se_ratio", "model.se_ratio", "Squeeze-and-excitation on every block (SENet; residual blocks: on the "
          "residual branch before the addition; Conv2D's plain blocks: after the last convolution, before the "
          "pooling) with a bottleneck of floor(channels x ratio) channels; 0 = off (the study's models), else "
          "from 1/8 (the narrowest blocks have 8 channels) to 1."),
    Alias("dropout", "model.dropout", "Dropout before the head (the study tried 0.25).", lower=0.0, upper=0.99),
    Alias("l2", "model.l2", "L2 penalty on LightConv2D kernels (default: the reference's 1e-4 for LightLayers "
          "models, 0 otherwise).", lower=0.0),
    Alias("paper_protocol", "paper_protocol", "The paper's own protocol: train on the whole official training set "
          "in stored order (no hold-out, no shuffling), drive ReduceLROnPlateau and EarlyStopping on the TEST "
          "split and report the LAST epoch's weights (the reference's ModelCheckpoint keeps every epoch)."),
    # data
    Alias("dataset", "data.dataset", "Dataset to train on. X-ray experiments: without --dataset/--manual_dir/"
          "--data_dir and without the study's chest_xray folders, the real PneumoniaMNIST X-rays embedded in the "
          "package; synthetic only when asked for.", _datasets),
    Alias("data_dir", "data.data_dir", "Folder of prepared data / downloaded files (or an npz for "
          "pneumonia_mnist)."),
    Alias("manual_dir", "data.manual_dir", "Folder holding chest_xray/ (or chest_xray/ itself) for "
          "--dataset=chest_xray."),
    Alias("image_size", "data.image_size", "Model input resolution (images are resized on device). Default: 299 "
          "on chest_xray (the study's); on PneumoniaMNIST a size that fits each model (28, or 64 for Conv2D).",
          lower=1),
    Alias("eval_image_size", "data.eval_image_size", "Evaluate at this resolution (FixRes; models ending in "
          "global pooling).", lower=1),
    Alias("augment", "data.augment", "On-device augmentation: study (its ImageDataGenerator) or acquisition "
          "(gamma, contrast, blur, noise, resolution round trips; docs/robust.md).",
          run_config.AUGMENTS),
    Alias("mixup", "data.mixup", "Mixup (Zhang et al. 2018): train on convex mixtures of batch pairs and their "
          "labels, weight ~ Beta(ALPHA, ALPHA) per batch; 0 (default): off.", lower=0.0),
    Alias("mean_subtraction", "data.mean_subtraction", "Subtract the training split's per-channel mean on device."),
    Alias("synthetic_size", "data.synthetic_size", "Training examples of synthetic data (val/test get half).",
          lower=1),
    Alias("on_corrupt", "data.on_corrupt", "Corrupt images when preparing data: skip (and report) or fail.",
          ("skip", "fail")),
    Alias("input_npz", "input_npz", "npz with an 'images' array, uint8 (N,H,W) or (N,H,W,C)."),
    Alias("output_npz", "output_npz", "Where to write 'probabilities' (N, num_classes) and 'predictions' (N,)."),
    Alias("seed_index", "seed_index", "Score only this replica of a --num_seeds run (0-based); default: the mean "
          "of every replica's probabilities.", lower=0),
    Alias("explain", "explain", "Also write 'heatmaps' (N, H, W) float32 of the predicted class: sliding-patch "
          "occlusion or Grad-CAM (conv models); docs/explain.md.", ("occlusion", "gradcam")),
    Alias("explain_patch", "explain_patch", "Occlusion patch side in pixels (default: about min(H, W) / 7).",
          lower=1),
    Alias("explain_stride", "explain_stride", "Occlusion stride in pixels (default: patch // 2).", lower=1),
    Alias("explain_dir", "explain_dir", "With --explain: one overlay PNG per image in this folder."),
    Alias("adapt_bn", "adapt_bn", "Re-estimate every BatchNorm layer's statistics on all the input images, layer "
          "by layer (AdaBN; needs >= 32 images, else it says so and does not adapt). Default: the run's stored "
          f"predict default, else off."),
    Alias("label_shift", "label_shift", "none, or em: re-estimate the class prior of the input images from the "
          "model's predictions (EM, Saerens et al. 2002) and move the decision to it instead of the stored target "
          "prior (needs >= 32 images). Default: the run's stored predict default, else none.", ("none", "em")),
    Alias("calibrate", "calibrate", "none, or temperature: divide the logits by the temperature fitted on the "
          "run's validation split (runs without one: 1) before any threshold. Default: the run's stored predict "
          "default, else none.", ("none", "temperature")),
    # optimizer
    Alias("learning_rate", "optimizer.learning_rate", "Adam learning rate.", lower=0.0),
    Alias("batch_size", "optimizer.batch_size", "Global batch size (split across devices); predict: images per "
          "forward pass.", lower=1),
    Alias("class_weighting", "optimizer.class_weighting", "Per-example loss weights: none, or balanced "
          "(n / (classes * n_c) from the training split's labels).", run_config.CLASS_WEIGHTINGS),
    # schedule
    Alias("epochs", "schedule.epochs", "Training epochs.", lower=1),
    Alias("lr_schedule", "schedule.lr_schedule", "Learning-rate schedule: constant (with --reduce_lr_patience if "
          "given) or cosine (decay to 0 over the run's steps, per step).", run_config.LR_SCHEDULES),
    Alias("warmup_epochs", "schedule.warmup_epochs", "Linear learning-rate warm-up epochs before the cosine decay "
          "(--lr_schedule=cosine).", lower=0),
    Alias("weight_averaging", "schedule.weight_averaging", "Evaluate, select and export an average of the "
          "weights over epochs: none, ema (per-epoch decay 1 - 1/--averaging_epochs) or swa (mean of the last "
          "--averaging_epochs epochs); training continues from the raw weights.", run_config.WEIGHT_AVERAGING),
    Alias("averaging_epochs", "schedule.averaging_epochs", "--weight_averaging's window in epochs.", lower=1),
    Alias("steps_per_epoch", "schedule.steps_per_epoch", "Cap on steps per epoch (smoke runs).", lower=1),
    # callbacks
    Alias("select_split", "callbacks.select_split", "Split on which the best checkpoint is chosen.",
          run_config.SELECT_SPLITS),
    Alias("early_stopping_patience", "callbacks.early_stopping_patience", "Stop after this many epochs without "
          "val-loss improvement (0: off).", lower=0),
    Alias("reduce_lr_patience", "callbacks.reduce_lr_patience", "Reduce the learning rate after this many epochs "
          "without improvement (0: off).", lower=0),
    Alias("reduce_lr_factor", "callbacks.reduce_lr_factor", "Factor of reduce-LR-on-plateau.", lower=0.0, upper=1.0),
    Alias("decision", "callbacks.decision", "Decision rule reported (two classes): argmax (0.5 threshold), or "
          "prior_corrected (threshold moved from the training split's class prior to the expected test prior; "
          "the 0.5 figures are reported too).", run_config.DECISIONS),
    # runtime
    Alias("seed", "runtime.seed", "Random seed (initialisation and data order)."),
    Alias("num_seeds", "runtime.num_seeds", "Independently initialised replicas (seeds seed..seed+N-1) trained "
          "together in one compiled step (see --replica_mode).", lower=1),
    Alias("replica_mode", "runtime.replica_mode", "How --num_seeds replicas share one compiled step: vmap "
          "(vectorised) or loop (one after the other, unrolled; plain convolutions, faster on CPU).",
          run_config.REPLICA_MODES),
    Alias("parallel", "runtime.parallel", "Data-parallel wrapper of the shared step.", run_config.PARALLEL_MODES),
    Alias("dtype", "runtime.dtype", "Compute dtype (parameters stay float32).", run_config.DTYPES),
    Alias("kernels", "runtime.kernels", "CPU kernels for convolution, BatchNorm and max pooling: native (default: "
          "oneDNN through XLA FFI where the library was built, else XLA's, said in the log and results.json; "
          "see docs/native.md) or xla. GPUs/TPUs always use XLA's.", run_config.KERNELS),
    Alias("resume", "runtime.resume", "Continue the run in --workdir exactly where it stopped."),
    Alias("concurrent_rows", "runtime.concurrent_rows", "xray_compare: rows trained at a time in one process "
          "(one native thread per call each; their times are then marked contended). 1: one after another.",
          lower=1),
    Alias("checkpoint_every", "runtime.checkpoint_every", "Epochs between checkpoints (--resume continues from "
          "the last one); 0: only after the last epoch. Default 1; xray_compare 0 (an interrupted row restarts, "
          "finished rows are kept).", lower=0),
    Alias("progress", "runtime.progress", "Console progress: auto (a per-step bar when stdout is a terminal, else "
          "one line per epoch), bars, epochs (one line per epoch), quiet (no epoch lines). --verbosity=-1 (or "
          "lower) without --progress means epochs, -2 or lower quiet.", ("auto", "bars", "epochs", "quiet")),
    Alias("profile", "runtime.profile", "Write a JAX profiler trace of a window of training steps into the "
          "workdir (TensorBoard's Profile tab: tensorboard --logdir runs/)."),
    Alias("profile_dir", "runtime.profile_dir", "Write the profiler trace here instead of the workdir (implies "
          "--profile)."),
    Alias("profile_start_step", "runtime.profile_start_step", "First profiled step (after warm-up).", lower=0),
    Alias("profile_steps", "runtime.profile_steps", "Number of profiled steps.", lower=1),
    Alias("coordinator_address", "runtime.coordinator_address", "host:port of process 0 for multi-process runs "
          "(jax.distributed.initialize)."),
    Alias("num_processes", "runtime.num_processes", "Number of processes of a multi-process run.", lower=1),
    Alias("process_id", "runtime.process_id", "This process's index in a multi-process run.", lower=0),
    # transfer
    Alias("backbone", "transfer.backbone", "ImageNet backbone (frozen), from the pretrained registry.", _backbones,
          only=("xray_transfer",)),
    Alias("transfer_backbone", "transfer.backbone", "Backbone of the transfer-learning row ('none' to skip it; "
          "InceptionV3 falls back to EfficientNet-Lite0 when its weights are not on disk).",
          lambda: ["none", *_backbones()], only=("xray_compare",)),
    Alias("pretrained_path", "transfer.pretrained_path", "Local weight file of the backbone."),
    Alias("feature_cache_dir", "transfer.feature_cache_dir", "Feature cache (default: $LIGHTFLAX_CACHE_DIR/features "
          "or ~/.cache/lightflax/features)."),
    Alias("finetune_blocks", "transfer.finetune_blocks", "Stage 2: unfreeze the backbone's last N blocks (0 = head "
          "only) and train them with the head at --finetune_learning_rate on cached trunk activations.", lower=0),
    Alias("finetune_epochs", "transfer.finetune_epochs", "Epochs of stage 2 (--finetune_blocks > 0).", lower=1),
    Alias("finetune_learning_rate", "transfer.finetune_learning_rate", "Learning rate of stage 2 (lower than "
          "stage 1's).", lower=0.0),
    # the speed study
    Alias("layers", "layers", "Run the per-layer sweep."),
    Alias("sizes", "sizes", "Input resolutions of the layer sweep.", is_list=True),
    Alias("batches", "batches", "Batch sizes.", is_list=True),
    Alias("widths", "widths", "c_in:c_out pairs of the layer sweep.", is_list=True),
    Alias("modes", "modes", "fwd and/or fwd+bwd.", is_list=True),
    Alias("kinds", "kinds", "Layer variants (default: all of them).", is_list=True),
    Alias("models", "models", "Whole models (name[:k]) timed with the trainer's train step.", is_list=True),
    Alias("model_sizes", "model_sizes", "Resolutions of the model sweep.", is_list=True),
    Alias("rounds", "rounds", "Interleaved measurement rounds.", lower=1),
)


def has(config: ml_collections.ConfigDict, path: str) -> bool:
    try:
        config_path.get_value(path, config)
    except (KeyError, AttributeError):
        return False
    return True


def aliases(config: ml_collections.ConfigDict) -> Tuple[Alias, ...]:
    """The short flags of this experiment's config."""
    return tuple(a for a in ALIASES if has(config, a.path) and (not a.only or config.experiment in a.only))


def define(config: ml_collections.ConfigDict, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the short flags of ``config`` (its values as defaults) in ``flag_values``."""
    for a in aliases(config):
        default, kind = config_path.get_value(a.path, config), config_path.get_type(a.path, config)
        if a.is_list:
            flags.DEFINE_list(a.flag, default.split(",") if default else None, a.help, flag_values=flag_values)
        elif a.choices is not None:
            choices = a.choices() if callable(a.choices) else a.choices
            flags.DEFINE_enum(a.flag, default, list(choices), a.help, flag_values=flag_values)
        elif kind is bool:
            flags.DEFINE_boolean(a.flag, default, a.help, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(a.flag, default, a.help, lower_bound=a.lower, upper_bound=a.upper,
                                 flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(a.flag, default, a.help, lower_bound=a.lower, upper_bound=a.upper,
                               flag_values=flag_values)
        else:
            flags.DEFINE_string(a.flag, default, a.help, flag_values=flag_values)


def config_overrides(argv: Sequence[str], name: str = "config") -> FrozenSet[str]:
    """The config paths given as --config.PATH=VALUE (or --[no]config.PATH) in ``argv``."""
    pattern = re.compile(rf"^--?(?:no)?{name}\.([A-Za-z0-9_.]+)")
    return frozenset(m.group(1) for m in map(pattern.match, argv) if m)


def apply(config: ml_collections.ConfigDict, argv: Sequence[str],
          flag_values: flags.FlagValues = flags.FLAGS) -> Tuple[ml_collections.ConfigDict, FrozenSet[str]]:
    """(``config`` with the short flags given on the command line written into their fields, every
    config path the command line set): a short flag and ``--config.PATH`` are the same thing."""
    explicit = set(config_overrides(argv))
    for a in aliases(config):
        if a.flag in flag_values and flag_values[a.flag].present:
            value = flag_values[a.flag].value
            config_path.set_value(a.path, config, ",".join(value) if a.is_list else value)
            explicit.add(a.path)
    return config, frozenset(explicit)


def record(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """results.json's ``flags``: every short flag of the experiment with its effective value."""
    out = {a.flag: config_path.get_value(a.path, config) for a in aliases(config)}
    out.update({a.flag: out[a.flag].split(",") for a in aliases(config) if a.is_list and out[a.flag]})
    return dict(out, experiment=config.experiment)


def check(config: ml_collections.ConfigDict) -> None:
    """Every short flag's field within its choices and bounds, also when set as --config.PATH."""
    from lightflax.errors import UserError

    for a in aliases(config):
        value = config_path.get_value(a.path, config)
        if value is None or a.is_list:
            continue
        choices = a.choices() if callable(a.choices) else a.choices
        if choices is not None and value not in choices:
            raise UserError(f"--{a.flag} must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        finite = "a finite number " if isinstance(value, float) else ""
        lower = a.lower if a.lower is not None else -math.inf
        if not value >= lower or finite and not math.isfinite(value):
            raise UserError(f"--{a.flag} must be {finite}>= {lower:g}, got {value!r}")
        if a.upper is not None and not value <= a.upper:
            raise UserError(f"--{a.flag} must be <= {a.upper:g}, got {value!r}")
