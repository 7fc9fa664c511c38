"""The one configuration object of a training run: a frozen, validated dataclass in sections.

    cfg = RunConfig(workdir="runs/a", model=ModelConfig("xray_light", {"k": 5}),
                    schedule=ScheduleConfig(epochs=3))
    cfg = RunConfig.flat(workdir="runs/a", model="xray_light", model_kwargs={"k": 5}, epochs=3)  # the same
    cfg2 = cfg.replace(epochs=10)   # a new, re-validated config; never setattr

Sections: model, data, optimizer, schedule, callbacks, runtime, transfer (the entry layer's
configs/_training.py has the same sections). Each section validates its own fields; RunConfig
checks what spans sections. A field is read as ``cfg.schedule.epochs``; the flat name
(``cfg.epochs``) still reads it, for steps.py (frozen while the speed work measures it) and the
loop, and is the form results.json records under ``config`` (:meth:`RunConfig.to_json`, the
same keys as before the sections, so ``predict``, ``tables`` and ``--resume`` read runs written
before them; :meth:`RunConfig.from_json` reads both). A bad value raises
:class:`lightflax.errors.UserError` naming the flag it comes from. Why a frozen dataclass and not
an ml_collections ConfigDict: docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

from lightflax.errors import UserError

PARALLEL_MODES = ("shard_map", "pmap")  # data-parallel wrapper of the step (lightflax.parallel)
REPLICA_MODES = ("vmap", "loop")  # how --num_seeds replicas share one step (lightflax.steps)
DTYPES = ("float32", "bfloat16")
AUGMENTS = ("none", "study", "acquisition")  # lightflax.data.augment.from_name
SELECT_SPLITS = ("val", "test")
KEEPS = ("best", "last")  # weights reported and exported: the best by the selection split's loss, or the last
OPTIMIZERS = ("adam", "sgd")
KERNELS = ("native", "xla")  # convolution/BatchNorm/pooling kernels on CPU (lightflax.native where built)
CLASS_WEIGHTINGS = ("none", "balanced")  # per-example loss weights (lightflax.steps.class_weights)
LR_SCHEDULES = ("constant", "cosine")  # lightflax.steps.learning_rate_schedule
WEIGHT_AVERAGING = ("none", "ema", "swa")  # lightflax.averaging
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
class ModelConfig:
    name: str  # a name of lightflax.models (the registry)
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"k": 5}
    channels: int = 3  # model input channels
    l2: float = 0.0  # the reference's L2 penalty on LightConv2D kernels

    def __post_init__(self):
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        _check_int("channels", self.channels, 1)
        if not self.l2 >= 0:
            raise UserError(f"--l2 must be >= 0, got {self.l2!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    image_size: Optional[int] = None  # model input resolution; None = the stored size
    eval_image_size: Optional[int] = None  # FixRes: evaluate at another resolution
    mean: Optional[Tuple[float, ...]] = None  # per-channel mean subtracted on device ([0, 1] units)
    augment: str = "none"  # "study": the study's ImageDataGenerator, on device
    shuffle: bool = True  # False: every epoch in the stored order (the LightLayers paper's protocol)
    mixup: float = 0.0  # mixup's Beta(alpha, alpha) parameter (lightflax.data.mixup); 0: off

    def __post_init__(self):
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        for name in ("image_size", "eval_image_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        check_flag_values(image_size=self.image_size, eval_image_size=self.eval_image_size)
        _check_choice("augment", self.augment, AUGMENTS)
        if not (isinstance(self.mixup, (int, float)) and math.isfinite(self.mixup) and self.mixup >= 0):
            raise UserError(f"--mixup must be a finite number >= 0 (0: off), got {self.mixup!r}")
        if self.augment == "acquisition" and self.mean is not None:
            raise UserError("--augment=acquisition changes images in [0, 1] units; drop --mean_subtraction")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"
    learning_rate: float = 1e-3
    batch_size: int = 64
    class_weighting: str = "none"  # "balanced": loss weights n / (C * n_c) from the training labels

    def __post_init__(self):
        _check_int("batch_size", self.batch_size, 1)
        check_flag_values(learning_rate=self.learning_rate)
        _check_choice("optimizer", self.name, OPTIMIZERS)
        _check_choice("class_weighting", self.class_weighting, CLASS_WEIGHTINGS)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 20
    lr_schedule: str = "constant"  # "cosine": decay to 0 over the run's steps (after warmup_epochs)
    warmup_epochs: int = 0  # linear warm-up from 0 (lr_schedule="cosine" only)
    steps_per_epoch: Optional[int] = None  # cap (smoke runs); None = full epochs
    weight_averaging: str = "none"  # ema | swa over epochs: what is evaluated and exported (lightflax.averaging)
    averaging_epochs: int = 5  # ema: time constant in epochs; swa: the last N epochs averaged

    def __post_init__(self):
        _check_int("epochs", self.epochs, 1)
        _check_choice("weight_averaging", self.weight_averaging, WEIGHT_AVERAGING)
        _check_int("averaging_epochs", self.averaging_epochs, 1)
        _check_int("warmup_epochs", self.warmup_epochs, 0)
        if self.steps_per_epoch is not None:
            _check_int("steps_per_epoch", self.steps_per_epoch, 1)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.warmup_epochs and self.lr_schedule == "constant":
            raise UserError("--warmup_epochs needs --lr_schedule=cosine; drop --warmup_epochs or add the schedule")
        if self.warmup_epochs >= self.epochs and self.lr_schedule != "constant":
            raise UserError(f"--warmup_epochs {self.warmup_epochs} must be smaller than --epochs {self.epochs}")


@dataclasses.dataclass(frozen=True)
class CallbacksConfig:
    """Selection, plateau callbacks and the reported decision rule."""

    select_split: str = "val"  # split that chooses the kept checkpoint and drives the callbacks
    keep: str = "best"  # "last": report/export each replica's last epoch (the LightLayers reference's checkpoint)
    early_stopping_patience: int = 0  # 0 = off
    reduce_lr_patience: int = 0  # 0 = off
    reduce_lr_factor: float = 0.1
    decision: str = "argmax"  # "prior_corrected": threshold moved to the target class prior (2 classes)

    def __post_init__(self):
        _check_int("early_stopping_patience", self.early_stopping_patience, 0)
        _check_int("reduce_lr_patience", self.reduce_lr_patience, 0)
        if not 0.0 <= self.reduce_lr_factor <= 1.0:
            raise UserError(f"--reduce_lr_factor must be in [0, 1], got {self.reduce_lr_factor!r}")
        for name, allowed in (("select_split", SELECT_SPLITS), ("keep", KEEPS), ("decision", DECISIONS)):
            _check_choice(name, getattr(self, name), allowed)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    seed: int = 0
    num_seeds: int = 1  # replicas seed .. seed+num_seeds-1, trained together
    replica_mode: str = "vmap"
    parallel: str = "shard_map"
    dtype: str = "float32"  # compute dtype (parameters stay float32)
    kernels: str = "native"  # "native" (oneDNN where available, else XLA) or "xla"
    resume: bool = False
    profile_dir: Optional[str] = None
    profile_start_step: int = 3
    profile_steps: int = 3
    checkpoint_every: int = 1  # epochs between checkpoints; 0: only after the last epoch (the run's end)

    def __post_init__(self):
        check_flag_values(seed=self.seed)
        _check_int("num_seeds", self.num_seeds, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_int("profile_steps", self.profile_steps, 1)
        _check_int("profile_start_step", self.profile_start_step, 0)
        for name, allowed in (("replica_mode", REPLICA_MODES), ("parallel", PARALLEL_MODES), ("dtype", DTYPES),
                              ("kernels", KERNELS)):
            _check_choice(name, getattr(self, name), allowed)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "schedule": ScheduleConfig,
            "callbacks": CallbacksConfig, "runtime": RuntimeConfig}
# flat name (results.json's config keys, RunConfig.flat) -> (section, field)
FLAT: Dict[str, Tuple[str, str]] = {
    **{f.name: (s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)},
    "model": ("model", "name"), "model_kwargs": ("model", "kwargs"), "optimizer": ("optimizer", "name")}
del FLAT["name"], FLAT["kwargs"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides the data. Defaults: the study's protocol."""

    workdir: str
    model: ModelConfig
    experiment: str = ""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    callbacks: CallbacksConfig = dataclasses.field(default_factory=CallbacksConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    transfer: Optional[TransferConfig] = None  # lightflax.transfer.run_transfer's settings

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"RunConfig.{name} must be a {cls.__name__}; RunConfig.flat takes flat fields")
        if self.schedule.lr_schedule != "constant" and self.callbacks.reduce_lr_patience:
            raise UserError(f"--lr_schedule={self.schedule.lr_schedule} cannot be combined with --reduce_lr_patience "
                            f"(both set the learning rate); drop one of them")
        if self.schedule.weight_averaging != "none" and self.runtime.resume:
            raise UserError(f"--weight_averaging={self.schedule.weight_averaging} cannot --resume (the average is "
                            f"not checkpointed); start the run again in a new --workdir")
        mean = self.data.mean
        if mean is not None and len(mean) not in (1, self.model.channels):
            raise UserError(f"mean has {len(mean)} entries; it needs 1 or --channels ({self.model.channels})")

    def __getattr__(self, name: str) -> Any:
        """The flat name of a section's field (``cfg.epochs`` is ``cfg.schedule.epochs``)."""
        if name in FLAT and name not in ("model", "optimizer"):
            section, field = FLAT[name]
            return getattr(object.__getattribute__(self, section), field)
        raise AttributeError(f"RunConfig has no field {name!r}")

    @classmethod
    def flat(cls, *, workdir: str, model: str, experiment: str = "", transfer=None, **fields) -> "RunConfig":
        """A RunConfig from flat fields (results.json's ``config`` keys): ``model`` is the model's name."""
        unknown = sorted(set(fields) - set(FLAT))
        if unknown:
            raise TypeError(f"RunConfig.flat: unknown field(s) {', '.join(unknown)}")
        parts: Dict[str, Dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, value in dict(fields, model=model).items():
            section, field = FLAT[name]
            parts[section][field] = value
        if isinstance(transfer, dict):
            transfer = TransferConfig(**transfer)
        return cls(workdir=workdir, experiment=experiment, transfer=transfer,
                   **{name: SECTIONS[name](**kw) for name, kw in parts.items()})

    @classmethod
    def from_json(cls, saved: Dict[str, Any]) -> "RunConfig":
        """A config that results.json (or a checkpoint) recorded; keys this version does not know are
        dropped (a run written by an older version lacks only newer ones, which take their defaults)."""
        known = set(FLAT) | {"workdir", "experiment", "transfer"}
        return cls.flat(**{k: v for k, v in saved.items() if k in known})

    def replace(self, **fields) -> "RunConfig":
        """A new, re-validated config with some flat fields changed (``cfg.replace(epochs=10)``)."""
        return RunConfig.flat(**dict(self.to_json(), transfer=self.transfer, **fields))

    def to_json(self) -> Dict[str, Any]:
        """The config as results.json records it, flat (``predict`` and ``--resume`` read it back)."""
        out: Dict[str, Any] = {"workdir": self.workdir}
        for name, (section, field) in FLAT.items():
            out[name] = getattr(getattr(self, section), field)
        out = dict(out, experiment=self.experiment, model_kwargs=dict(self.model.kwargs),
                   mean=list(self.data.mean) if self.data.mean is not None else None)
        if self.transfer is not None:
            out["transfer"] = dataclasses.asdict(self.transfer)
        return out


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


def _check_choice(name: str, value: Any, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
