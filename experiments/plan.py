"""config -> plan: the one place that picks the dataset, the input sizes and the workdir, and
validates, before any data is prepared or anything is trained.

    plan = resolve(config, explicit)   # config: configs/<experiment>.py after the command line

``explicit`` names the config fields the command line set (a recipe never overwrites them; a flag
that does not apply is an error only when given). What each field means: configs/_training.py; what
each short flag sets: experiments/cli.py, ALIASES. The library (lightflax/) checks only its own
invariants (RunConfig's values, the model's input against the data it is given).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import sys
from typing import Any, Dict, FrozenSet, NamedTuple, Optional, Sequence, Tuple

import ml_collections

from experiments import cli, recipes
from lightflax import data as data_lib, memory, models, param_counts
from lightflax.config import (CallbacksConfig, DataConfig, ModelConfig, OptimizerConfig, RunConfig, RuntimeConfig,
                              ScheduleConfig, TransferConfig)
from lightflax.errors import UserError

XRAY_DEFAULT, XRAY_EMBEDDED = "chest_xray", "pneumonia_mnist"
STANDARD_SIZES = (64, 128, 224, 299)  # also chest_xray's stored resolutions
EMBEDDED_NOTE = ("data: no chest_xray folder found (pass --manual_dir=FOLDER for the study's Kaggle images); "
                 "training on the embedded real PneumoniaMNIST chest X-rays (28x28, MedMNIST v2, train 4,708 / "
                 "val 524, no test split)")
STUDY_MAX_K = 5  # the X-ray study's largest rank (xray_compare's rows: K = 1, 2, 5)
STUDY_LARGEST = "xray_conv2d"  # its largest model trained from scratch
PAPER_NOTE = ("paper protocol (--paper_protocol): no shuffling; ReduceLROnPlateau and EarlyStopping on the TEST "
              "split (they see the test loss, as the paper's callbacks did); the reported and exported weights are "
              "the LAST epoch's (the reference's ModelCheckpoint has no save_best_only), not the best test epoch")


@dataclasses.dataclass(frozen=True)
class Row:
    """One trained model of the plan: its label in tables and its complete RunConfig."""

    label: str
    run: RunConfig


@dataclasses.dataclass(frozen=True)
class Plan:
    experiment: str
    workdir: str
    dataset: str
    note: Optional[str]  # the console line on the dataset choice (also in results.json)
    load: Dict[str, Any]  # keyword arguments of lightflax.data.load (or the synthetic data)
    rows: Tuple[Row, ...]
    mean_subtraction: bool
    record: Dict[str, Any]  # results.json's flags and recipe entries
    data_notes: Tuple[str, ...] = ()  # lines added to the data's notes (results.json)
    comparison_notes: Tuple[str, ...] = ()  # xray_compare: lines under its table


def default_workdir(experiment: str, tags: Sequence[str] = ()) -> str:
    """runs/<experiment>-<tags>-<UTC time> (e.g. runs/xray_light-k5-28px-20261130-061500): where a run goes
    without --workdir; the tags name what varies between runs (rank, input size, backbone)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", "-".join([experiment, *tags, stamp]))


class _Draft(NamedTuple):
    """A row before its RunConfig: what _rows decided."""

    label: str
    subfolder: str  # "" for a one-row experiment; xray_compare: light_k1, ..., conv2d, transfer
    model: str
    kwargs: Dict[str, Any]
    image_size: Optional[int]
    transfer: Optional[TransferConfig]
    fields: Dict[str, Any]  # flat RunConfig overrides (the paper protocol's)


def resolve(config: ml_collections.ConfigDict, explicit: FrozenSet[str] = frozenset()) -> Plan:
    """The plan of a training experiment (xray_*, mnist, fashion_mnist, cifar10, cifar100), in order:
    the recipe (recipes.apply), the dataset (resolve_dataset), each row's model and input size (_rows,
    image_size), the workdir (default_workdir, check_workdir), each row's RunConfig (_run_config, which
    validates) and the data's loading arguments (_load_args)."""
    config, recipe_record = recipes.apply(config, explicit)
    dataset, note = resolve_dataset(config.data)
    drafts, tags, notes = _rows(config, explicit, dataset)
    workdir = config.workdir or default_workdir(config.experiment, tags)
    check_workdir(workdir, config.runtime.resume)
    rows = tuple(Row(d.label, _run_config(config, d.model, d.kwargs, d.image_size,
                                          os.path.join(workdir, d.subfolder) if d.subfolder else workdir,
                                          d.transfer, **d.fields))
                 for d in drafts)
    warnings = tuple(large_model_warnings(rows))
    paper = bool(config.get("paper_protocol"))
    size = max((r.run.image_size or 299) for r in rows)  # the transfer head: the study's 299 when stored
    load = _load_args(config, dataset, size, paper)
    check_memory_budget(config, dataset, rows, load)
    return Plan(config.experiment, workdir, dataset, note, load, rows,
                config.data.mean_subtraction, dict(flags=cli.record(config), **recipe_record),
                ((PAPER_NOTE,) if paper else ()) + warnings, tuple(notes))


def check_memory_budget(config: ml_collections.ConfigDict, dataset: str, rows: Sequence[Row],
                        load: Dict[str, Any]) -> None:
    """The run's memory from shapes alone, before anything is allocated (lightflax.memory.check_budget):
    synthetic splits (host and device copies) plus, on the CPU, the largest row's training lower bound
    (lightflax.memory.lower_bound_bytes; accelerators are checked by the trainer against their own memory)."""
    import jax

    parts, have = {}, memory.host_available_bytes()
    if dataset == "synthetic":
        n, shape = sum(load["synthetic_sizes"].values()), load["synthetic_shape"]
        parts["synthetic splits"] = (2 * n * math.prod(shape), f"use a smaller --synthetic_size (now "
                                     f"{config.data.synthetic_size}) or --image_size")
    seeds, batch = config.runtime.num_seeds, config.optimizer.batch_size
    sized = [r for r in rows if r.run.transfer is None and r.run.image_size]
    if sized and jax.default_backend() == "cpu":
        local = max(1, batch // jax.device_count())
        need = max(memory.lower_bound_bytes(models.create(r.run.model.name, **r.run.model_kwargs),
                                            (r.run.image_size, r.run.image_size, r.run.channels), local, seeds)
                   for r in sized)
        fits = int(((have or 0) - sum(b for b, _ in parts.values())) // (need / seeds))
        parts["training"] = (need, f"use --num_seeds={fits} or fewer, or a smaller --batch_size" if seeds > 1 and fits
                             else f"use a smaller --batch_size (now {batch}) or --image_size")
    memory.check_budget(parts, have)


def large_model_warnings(rows: Sequence[Row]) -> list:
    """A printed warning (not a refusal) for each X-ray row whose rank makes it over 10x the parameters of
    the study's largest from-scratch model (Conv2D) at the same input; counted from shapes (nothing is
    allocated), and only for a rank above the study's."""
    lines = []
    for row in rows:
        k, name = row.run.model_kwargs.get("k"), row.run.model.name
        if not name.startswith("xray_") or not isinstance(k, int) or k <= STUDY_MAX_K:
            continue
        reference = models.create(STUDY_LARGEST)
        side = max(row.run.image_size or 64, reference.min_input_size())
        shape = (1, side, side, row.run.channels)
        n = param_counts.param_counts(models.create(name, **row.run.model_kwargs), shape)["total"]
        ref = param_counts.param_counts(reference, shape)["total"]
        if n > 10 * ref:
            lines.append(f"WARNING: --k={k} gives {name} {n:,} parameters, {n / ref:.0f}x the study's largest "
                         f"from-scratch model (Conv2D: {ref:,} at {side}px); training it is slow and needs memory "
                         f"to match (the study's ranks are 1 to {STUDY_MAX_K})")
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    return lines


def resolve_dataset(data: ml_collections.ConfigDict) -> Tuple[str, Optional[str]]:
    """(dataset name, the one console line saying why): no --dataset means chest_xray, or the embedded
    real PneumoniaMNIST when no chest_xray folder is found and no data folder was given; a choice that
    was given must be present (UserError otherwise)."""
    name = data.dataset or XRAY_DEFAULT
    if data.manual_dir is not None and name != "chest_xray":
        raise UserError(f"--manual_dir applies to --dataset=chest_xray only (got --dataset={name}); "
                        f"use --data_dir for {name}")
    if name == "synthetic":
        return name, None
    chosen = data.dataset is not None or data.data_dir is not None or data.manual_dir is not None
    if name == XRAY_DEFAULT and not chosen and not data_lib.available(name):
        return XRAY_EMBEDDED, EMBEDDED_NOTE
    if name == "chest_xray" and data.data_dir and os.path.isfile(os.path.expanduser(data.data_dir)):
        npz = " (a PneumoniaMNIST npz: add --dataset=pneumonia_mnist)" if data.data_dir.endswith(".npz") else ""
        default = "" if data.dataset else " (the default without --dataset)"
        raise UserError(f"--data_dir={data.data_dir} is a file; chest_xray{default} keeps its prepared copy in a "
                        f"folder: pass a folder{npz}")
    given = [f"--{n}={data[n]}" for n in ("data_dir", "manual_dir") if data[n] is not None]
    if given and not data_lib.available(name, data_dir=data.data_dir, manual_dir=data.manual_dir):
        if name == "chest_xray" and data.data_dir and not data.manual_dir:
            return name, None  # a prepared copy in --data_dir: load() checks it
        raise UserError(f"{' '.join(given)} holds no {name} data; pass the folder that holds it "
                        f"(see README, Data) or leave the flag out")
    return name, None


@functools.lru_cache(maxsize=None)
def min_input_size(model: str, kwargs: Tuple[Tuple[str, Any], ...] = ()) -> int:
    """The smallest input side the model takes (its module is constructed once per model, never
    initialised)."""
    return models.create(model, num_classes=models.info(model).num_classes or 2, **dict(kwargs)).min_input_size()


def image_size(config: ml_collections.ConfigDict, label: str, model: str, kwargs: Dict[str, Any],
               dataset: str) -> int:
    """The row's input size, checked: --image_size when given; else 299 (the study's) except on the
    embedded PneumoniaMNIST, where it is 28 if the model takes it, else the smallest standard size
    (64, 128, ...) that it takes."""
    need = min_input_size(model, tuple(sorted(kwargs.items())))
    size = config.data.image_size
    if size is None:
        size = (28 if need <= 28 else next((s for s in STANDARD_SIZES if s >= need), STANDARD_SIZES[-1])) \
            if dataset == XRAY_EMBEDDED else 299
    elif size < need:
        raise UserError(f"--image_size={size} is too small for {label} ({model}): it needs at least "
                        f"{need}x{need}; pass --image_size={next(s for s in STANDARD_SIZES if s >= need)} "
                        f"or leave --image_size out (each row then gets a size that fits)")
    return size


def _rows(config: ml_collections.ConfigDict, explicit: FrozenSet[str], dataset: str) -> Tuple[list, list, list]:
    """([_Draft], default workdir tags, notes)."""
    if config.experiment == "xray_compare":
        return _compare_rows(config, dataset)
    if "transfer" in config:
        return [_Draft(config.model.name, "", "linear_head", {}, config.data.image_size, _transfer(config.transfer),
                       {})], [config.transfer.backbone], []
    model, kwargs, fields = config.model.name, {}, {}
    if "method" in config.model:  # the LightLayers paper's experiments
        model, kwargs, fields = _paper_model(config, explicit)
    elif "k" in config.model:
        kwargs = {"k": config.model.k}
    kwargs = _se(config, kwargs)
    size = image_size(config, model, model, kwargs, dataset)
    return [_Draft(model, "", model, kwargs, size, None, fields)], _tags(kwargs, size), []


def _se(config: ml_collections.ConfigDict, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """--se_ratio into the model's keyword arguments, only when given as non-zero: a run without
    squeeze-and-excitation records what it always did (its model is then checked on construction)."""
    ratio = config.model.get("se_ratio")
    return dict(kwargs, se_ratio=ratio) if ratio else kwargs


def _tags(kwargs: Dict[str, Any], size: Optional[int]) -> list:
    """What varies between runs, for the default run folder name: k5, se0.25, 28px."""
    return ([f"k{kwargs['k']}"] if "k" in kwargs else []) + \
        ([f"se{kwargs['se_ratio']:g}"] if "se_ratio" in kwargs else []) + ([f"{size}px"] if size else [])


def _paper_model(config: ml_collections.ConfigDict, explicit: FrozenSet[str]):
    method = config.model.method
    if method != "light" and "model.k" in explicit:
        raise UserError(f"--k applies to --method=light only (got --method={method})")
    model = config.model.name or f"{config.model.family}_{method}"
    kwargs = {"k": config.model.k} if method == "light" else {}
    if not config.paper_protocol:
        return model, kwargs, {}
    if "callbacks.select_split" in explicit and config.callbacks.select_split != "test":
        raise UserError(f"--paper_protocol selects on the test split; drop --select_split="
                        f"{config.callbacks.select_split}")
    return model, kwargs, dict(select_split="test", shuffle=False, keep="last")


def _compare_rows(config: ml_collections.ConfigDict, dataset: str) -> Tuple[list, list, list]:
    try:
        ks = [int(k) for k in config.model.ks.split(",")]
    except ValueError:
        raise UserError(f"--ks must be a comma-separated list of integers, got {config.model.ks}") from None
    if not ks or any(k < 1 for k in ks):
        raise UserError(f"--ks values must be >= 1, got {config.model.ks}")
    rows = [(f"LightLayers K={k}", f"light_k{k}", "xray_light", {"k": k}) for k in ks]
    rows.append(("Conv2D", "conv2d", "xray_conv2d", {}))
    se = f" + SE {config.model.se_ratio:g}" if config.model.get("se_ratio") else ""
    rows = [(label + se, sub, model, _se(config, kwargs)) for label, sub, model, kwargs in rows]
    out = [_Draft(label, sub, model, kwargs, image_size(config, label, model, kwargs, dataset), None, {})
           for label, sub, model, kwargs in rows]
    sizes = sorted({d.image_size for d in out})
    backbone, note = transfer_backbone(config.transfer)
    if backbone:
        out.append(_Draft(f"transfer ({backbone})", "transfer", "linear_head", {}, config.data.image_size,
                          _transfer(config.transfer, backbone=backbone), {}))
    return out, ["-".join(f"{s}px" for s in sizes)], [note] if note else []


def transfer_backbone(transfer: ml_collections.ConfigDict) -> Tuple[Optional[str], Optional[str]]:
    """xray_compare's transfer row: (backbone or None, note or None), without downloading anything."""
    from lightflax import pretrained
    from lightflax.pretrained import download, inception_v3

    choice = transfer.backbone
    if choice == "none":
        return None, None
    if transfer.pretrained_path or choice != "inception_v3":
        return choice, None
    if download.find_file(inception_v3.WEIGHTS[False][0], download.weights_dirs()):
        return choice, None
    try:
        pretrained.find_weights("efficientnet_lite0")
    except UserError:
        return choice, None  # the row then says why it was skipped
    return "efficientnet_lite0", ("transfer row: InceptionV3 weights not found on disk; using EfficientNet-Lite0 "
                                  "(offline weights) instead")


def _transfer(section: ml_collections.ConfigDict, backbone: Optional[str] = None) -> TransferConfig:
    return TransferConfig(backbone=backbone or section.backbone, pretrained_path=section.pretrained_path,
                          cache_dir=section.feature_cache_dir, finetune_blocks=section.finetune_blocks,
                          finetune_epochs=section.finetune_epochs,
                          finetune_learning_rate=section.finetune_learning_rate)


def _run_config(config: ml_collections.ConfigDict, model: str, kwargs: Dict[str, Any], size: Optional[int],
                workdir: str, transfer: Optional[TransferConfig], **fields) -> RunConfig:
    """The row's RunConfig, section by section from the config's (validated on construction); ``fields``:
    flat overrides (the paper protocol's). The mean of --mean_subtraction comes after loading."""
    m, d, o, s, c, r = (config.model, config.data, config.optimizer, config.schedule, config.callbacks,
                        config.runtime)
    kwargs = dict(kwargs, **({"impl": m.impl} if m.impl is not None else {}),
                  **({"dropout": m.dropout} if m.dropout else {}))
    run = RunConfig(
        workdir=workdir, experiment=config.experiment, transfer=transfer,
        model=ModelConfig(model, kwargs, channels=m.channels,
                          l2=m.l2 if m.l2 is not None else models.info(model).reference_l2),
        data=DataConfig(image_size=size, eval_image_size=d.eval_image_size, augment=d.augment,
                        mixup=d.get("mixup", 0.0)),
        optimizer=OptimizerConfig(learning_rate=o.learning_rate, batch_size=o.batch_size,
                                  class_weighting=o.class_weighting),
        schedule=ScheduleConfig(**s),
        callbacks=CallbacksConfig(**c),
        runtime=RuntimeConfig(seed=r.seed, num_seeds=r.num_seeds, replica_mode=r.replica_mode, parallel=r.parallel,
                              dtype=r.dtype, kernels=r.kernels, resume=r.resume,
                              checkpoint_every=r.checkpoint_every,
                              profile_dir=r.profile_dir or (workdir if r.profile else None),  # next to the scalars
                              profile_start_step=r.profile_start_step, profile_steps=r.profile_steps))
    return run.replace(**fields) if fields else run


def _load_args(config: ml_collections.ConfigDict, dataset: str, size: int, paper: bool) -> Dict[str, Any]:
    """lightflax.data.load's arguments for this plan (synthetic data: its shape and split sizes)."""
    d, n = config.data, config.data.synthetic_size
    if dataset == "synthetic":
        channels = config.model.channels if "method" in config.model else 1
        shape = (64, 64, 1) if "transfer" in config and config.experiment != "xray_compare" else (size, size, channels)
        return dict(synthetic_shape=shape, synthetic_sizes={"train": n, "val": max(1, n // 2), "test": max(1, n // 2)},
                    num_classes=config.model.get("num_classes", 2), seed=config.runtime.seed)
    stored = next((r for r in STANDARD_SIZES if size <= r), 299) if dataset == "chest_xray" else None
    return dict(data_dir=d.data_dir, manual_dir=d.manual_dir, seed=config.runtime.seed, on_corrupt=d.on_corrupt,
                stored_size=stored, holdout=not paper)


def check_workdir(path: str, resume: bool) -> None:
    """The run folder: not an existing file, not a finished or running run unless --resume, and
    creatable (its nearest existing parent is a writable folder). Nothing is created here."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--workdir {path} is an existing file; choose a folder")
    ckpts = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpts) and os.listdir(ckpts) and not resume:
        raise UserError(f"--workdir {path} already holds a run; pass --resume to continue it or choose "
                        f"another --workdir")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--workdir {path} cannot be created ({parent} is not a writable folder); "
                        f"choose a writable folder")
