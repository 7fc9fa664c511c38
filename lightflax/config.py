"""The one configuration object of a training run: a frozen, validated dataclass.

    cfg = RunConfig(workdir="runs/a", model="xray_light", model_kwargs={"k": 5}, epochs=3)
    cfg2 = dataclasses.replace(cfg, epochs=10)   # a new, re-validated config; never setattr

The entry layer (``launch.py`` / ``experiments/``) builds it once from the
command line; the library only reads it. Every field is a plain JSON value, so
``dataclasses.asdict(cfg)`` is what results.json records under ``config`` and
what ``predict`` reads back. Validation happens in ``__post_init__``: a bad
value raises :class:`lightflax.errors.UserError` naming the flag it comes from.
Why a frozen dataclass and not an ml_collections ConfigDict: docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

from lightflax.errors import UserError

PARALLEL_MODES = ("shard_map", "pmap")  # data-parallel wrapper of the step (lightflax.parallel)
REPLICA_MODES = ("vmap", "loop")  # how --num_seeds replicas share one step (lightflax.steps)
DTYPES = ("float32", "bfloat16")
AUGMENTS = ("none", "study")
SELECT_SPLITS = ("val", "test")
KEEPS = ("best", "last")  # weights reported and exported: the best by the selection split's loss, or the last
OPTIMIZERS = ("adam", "sgd")
KERNELS = ("native", "xla")  # convolution/BatchNorm/pooling kernels on CPU (lightflax.native where built)
CLASS_WEIGHTINGS = ("none", "balanced")  # per-example loss weights (lightflax.steps.class_weights)
LR_SCHEDULES = ("constant", "cosine")  # lightflax.steps.learning_rate_schedule
DECISIONS = ("argmax", "prior_corrected")  # the reported decision rule (lightflax.train, results.json 'decision')


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """The transfer-learning settings of a run (lightflax.transfer): a frozen ImageNet backbone +
    a linear head, optionally a second stage that fine-tunes the backbone's last blocks."""

    backbone: str  # a name of lightflax.pretrained
    pretrained_path: Optional[str] = None  # a local weight file; None: the registry's search
    cache_dir: Optional[str] = None  # feature cache; None: lightflax.transfer.default_cache_dir()
    finetune_blocks: int = 0  # stage 2: unfreeze the last N blocks (0: head only)
    finetune_epochs: int = 10
    finetune_learning_rate: float = 1e-5

    def __post_init__(self):
        _check_int("finetune_blocks", self.finetune_blocks, 0)
        _check_int("finetune_epochs", self.finetune_epochs, 1)
        lr = self.finetune_learning_rate
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise UserError(f"--finetune_learning_rate must be a finite number > 0, got {lr!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides the data. Defaults: the study's protocol."""

    workdir: str
    model: str  # a name of lightflax.models (the registry)
    model_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"k": 5}
    experiment: str = ""
    batch_size: int = 64
    epochs: int = 20
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    l2: float = 0.0  # the reference's L2 penalty on LightConv2D kernels
    seed: int = 0
    num_seeds: int = 1  # replicas seed .. seed+num_seeds-1, trained together
    replica_mode: str = "vmap"
    parallel: str = "shard_map"
    dtype: str = "float32"  # compute dtype (parameters stay float32)
    image_size: Optional[int] = None  # model input resolution; None = the stored size
    channels: int = 3  # model input channels
    mean: Optional[Tuple[float, ...]] = None  # per-channel mean subtracted on device ([0, 1] units)
    augment: str = "none"  # "study": the study's ImageDataGenerator, on device
    eval_image_size: Optional[int] = None  # FixRes: evaluate at another resolution
    select_split: str = "val"  # split that chooses the best checkpoint and drives the callbacks
    keep: str = "best"  # "last": report/export each replica's last epoch (the LightLayers reference's checkpoint)
    shuffle: bool = True  # False: every epoch in the stored order (the LightLayers paper's protocol)
    early_stopping_patience: int = 0  # 0 = off
    reduce_lr_patience: int = 0  # 0 = off
    reduce_lr_factor: float = 0.1
    steps_per_epoch: Optional[int] = None  # cap (smoke runs); None = full epochs
    profile_dir: Optional[str] = None
    profile_start_step: int = 3
    profile_steps: int = 3
    resume: bool = False
    kernels: str = "native"  # "native" (oneDNN where available, else XLA) or "xla"
    class_weighting: str = "none"  # "balanced": loss weights n / (C * n_c) from the training labels
    lr_schedule: str = "constant"  # "cosine": decay to 0 over the run's steps (after warmup_epochs)
    warmup_epochs: int = 0  # linear warm-up from 0 (lr_schedule="cosine" only)
    decision: str = "argmax"  # "prior_corrected": threshold moved to the target class prior (2 classes)
    transfer: Optional[TransferConfig] = None  # lightflax.transfer.run_transfer's settings


    def __post_init__(self):
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        if isinstance(self.transfer, dict):  # read back from results.json
            object.__setattr__(self, "transfer", TransferConfig(**self.transfer))
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        for name in ("batch_size", "epochs", "num_seeds", "channels", "profile_steps"):
            _check_int(name, getattr(self, name), 1)
        for name in ("image_size", "eval_image_size", "steps_per_epoch"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("seed", "early_stopping_patience", "reduce_lr_patience", "profile_start_step", "warmup_epochs"):
            _check_int(name, getattr(self, name), 0)
        check_flag_values(seed=self.seed, image_size=self.image_size, eval_image_size=self.eval_image_size,
                          learning_rate=self.learning_rate)
        if not self.l2 >= 0:
            raise UserError(f"--l2 must be >= 0, got {self.l2!r}")
        if not 0.0 <= self.reduce_lr_factor <= 1.0:
            raise UserError(f"--reduce_lr_factor must be in [0, 1], got {self.reduce_lr_factor!r}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("replica_mode", REPLICA_MODES),
                              ("parallel", PARALLEL_MODES), ("dtype", DTYPES), ("augment", AUGMENTS),
                              ("select_split", SELECT_SPLITS), ("keep", KEEPS), ("kernels", KERNELS),
                              ("class_weighting", CLASS_WEIGHTINGS), ("lr_schedule", LR_SCHEDULES),
                              ("decision", DECISIONS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.lr_schedule != "constant" and self.reduce_lr_patience:
            raise UserError(f"--lr_schedule={self.lr_schedule} cannot be combined with --reduce_lr_patience "
                            f"(both set the learning rate); drop one of them")
        if self.warmup_epochs and self.lr_schedule == "constant":
            raise UserError("--warmup_epochs needs --lr_schedule=cosine; drop --warmup_epochs or add the schedule")
        if self.warmup_epochs >= self.epochs and self.lr_schedule != "constant":
            raise UserError(f"--warmup_epochs {self.warmup_epochs} must be smaller than --epochs {self.epochs}")
        if self.mean is not None and len(self.mean) not in (1, self.channels):
            raise UserError(f"mean has {len(self.mean)} entries; it needs 1 or --channels ({self.channels})")

    def to_json(self) -> Dict[str, Any]:
        """The config as results.json records it (``predict`` reads it back)."""
        return dataclasses.asdict(self)


MAX_IMAGE_SIZE = 2048  # one 2048x2048 RGB float32 image is 48 MiB; the study's largest input is 299


def check_flag_values(**values: Any) -> None:
    """Checks the flags that are used before a RunConfig exists (data loading uses --seed and
    --image_size): launch.py calls it right after parsing, RunConfig again. None = not given."""
    if values.get("seed") is not None:
        _check_int("seed", values["seed"], 0)
    for name in ("image_size", "eval_image_size"):
        size = values.get(name)
        if size is not None and isinstance(size, int) and size > MAX_IMAGE_SIZE:
            raise UserError(f"--{name} {size} is larger than {MAX_IMAGE_SIZE}, the largest input lightflax "
                            f"accepts; use a smaller --{name}")
    lr = values.get("learning_rate")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"--learning_rate must be a finite number > 0, got {lr!r}")


def _check_int(name: str, value: Any, lowest: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
        raise UserError(f"--{name} must be an integer >= {lowest}, got {value!r}")
