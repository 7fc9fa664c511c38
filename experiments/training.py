"""plan -> data -> trained rows: what every training experiment does after experiments/plan.py.

The plan has checked every value, the input sizes, the workdir and the data's presence: an error
here comes from the data itself or from training, and an early one leaves no run folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Dict, FrozenSet

import ml_collections
import numpy as np
from absl import flags

from experiments import plan as plan_lib
from lightflax import data as data_lib, parallel, progress, train
from lightflax.data import pipeline
from lightflax.errors import DataError


def configure(config: ml_collections.ConfigDict) -> None:
    """jax.distributed (multi-process runs) and the console: --progress, or --verbosity without it."""
    r = config.runtime
    parallel.initialize_distributed(r.coordinator_address, r.num_processes, r.process_id)
    mode, verbosity = r.progress, flags.FLAGS["verbosity"]
    if mode == "auto" and verbosity.present and verbosity.value < 0:
        mode = "epochs" if verbosity.value == -1 else "quiet"
    progress.set_mode(mode)
    if not progress.bars_enabled():  # TFDS's own preparation bars (chest_xray) follow the same rule
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()


def load(plan: plan_lib.Plan):
    """The plan's dataset, its note printed once and recorded in the data's notes (results.json)."""
    if plan.dataset == "synthetic":
        data = data_lib.load("synthetic", **plan.load)
    else:
        with progress.task(f"loading {plan.dataset}"):
            data = data_lib.load(plan.dataset, **plan.load)
    check_train_classes(data)
    if plan.note:
        print(plan.note, flush=True)
        data.notes.insert(0, plan.note)
    data.notes.extend(plan.data_notes)
    return data


def check_train_classes(data) -> None:
    """A train split without some class (a real data set's; synthetic labels are random) is refused
    before training: the model could not learn it, and the prior correction divides by its share."""
    train_split = data.splits.get("train")
    if data.synthetic or train_split is None:
        return
    present = set(np.unique(np.asarray(train_split.labels)).tolist())
    missing = [str(data.class_names[c]) for c in range(data.num_classes) if c not in present]
    if missing:
        raise DataError(f"the train split of {data.name} ({data.source}) holds no image of class "
                        f"{', '.join(missing)}; training needs every class: add its images or fix the labels")


def train_row(plan: plan_lib.Plan, row: plan_lib.Row, data) -> Dict[str, Any]:
    """One row trained (a transfer row through lightflax.transfer); returns results.json's content."""
    cfg = row.run
    if plan.mean_subtraction:
        mean = pipeline.channel_mean(data.splits["train"].images)
        cfg = cfg.replace(mean=mean * cfg.channels if len(mean) == 1 and cfg.channels > 1 else mean)
    extra = dict(plan.record, **({"data_default": plan.note} if plan.note else {}))
    if cfg.transfer is not None:
        from lightflax import transfer

        return transfer.run_transfer(data, cfg, extra=extra)
    return train.train_and_evaluate(cfg, data, extra=extra)


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


def main(config: ml_collections.ConfigDict, explicit: FrozenSet[str] = frozenset()) -> Dict[str, Any]:
    """A one-row training experiment, start to end; returns results.json's content."""
    configure(config)
    plan = plan_lib.resolve(config, explicit)
    with no_empty_folder_on_error(plan.workdir):
        return train_row(plan, plan.rows[0], load(plan))
