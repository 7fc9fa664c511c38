"""TensorBoard scalar summaries in the run folder (tensorboardX: pure Python, no TensorFlow).

    with tensorboard.Writer(workdir) as tb:          # events.out.tfevents.* in workdir
        tb.epoch(global_step, {"train/loss": 0.3, "val/roc_auc": 0.9, ...})
    tensorboard.read_scalars(workdir)                # {tag: [(step, value), ...]}

``tensorboard --logdir runs/`` shows every run's curves (and, with --profile, the
profiler trace written into the same folder). Tags: train/loss, train/accuracy,
<split>/loss, <split>/accuracy, <split>/roc_auc (binary tasks), learning_rate,
step_time_s (median step of the epoch), images_per_s; the mean over replicas
with --num_seeds > 1. :func:`read_scalars` reads the event files back with
tensorboardX's own protobufs (TFRecord framing), for tests and scripts.
"""

from __future__ import annotations

import glob
import os
import struct
from typing import Dict, List, Optional, Tuple


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch at module
    level when it is installed (3.6 s per run start on the 2-core machine) only to accept torch
    tensors, which the scalars written here never are. While ``sys.modules["torch"]`` is None an
    ``import torch`` raises ImportError, tensorboardX's own fallback; the entry is removed after,
    so a later ``import torch`` works as usual. A torch already imported is used as it is."""
    import sys

    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class Writer:
    """Scalars of one run; ``enabled=False`` (processes other than 0) writes nothing."""

    def __init__(self, logdir: str, enabled: bool = True):
        self._writer = None
        if enabled:
            self._writer = _summary_writer_class()(logdir=logdir, flush_secs=10)

    def epoch(self, step: int, scalars: Dict[str, Optional[float]]) -> None:
        if self._writer is None:
            return
        for tag, value in scalars.items():
            if value is not None:
                self._writer.add_scalar(tag, float(value), global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def epoch_scalars(row: Dict, selected: List[Dict], select_split: str, step_median_s: Optional[float],
                  images_per_epoch: int) -> Dict[str, Optional[float]]:
    """The scalars of one epoch from the training loop's history row and selection-split metrics."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    out = {
        "train/loss": mean(row["train_loss"]), "train/accuracy": mean(row["train_accuracy"]),
        f"{select_split}/loss": mean(row["select_loss"]), f"{select_split}/accuracy": mean(row["select_accuracy"]),
        f"{select_split}/roc_auc": mean([m.get("roc_auc") for m in selected]),
        "learning_rate": mean(row["learning_rate"]),
        "step_time_s": step_median_s,
        "images_per_s": images_per_epoch / row["train_s"] if row.get("train_s") else None,
    }
    return out


def _records(path: str):
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            f.read(4)  # the data's masked CRC
            if len(data) < length:
                return
            yield data


def read_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
    """Every scalar of the event files directly in ``logdir``: {tag: [(step, value), ...]} in file order."""
    from tensorboardX.proto import event_pb2

    out: Dict[str, List[Tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for data in _records(path):
            event = event_pb2.Event.FromString(data)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
