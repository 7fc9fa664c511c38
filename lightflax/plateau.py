"""Per-seed reduce-LR-on-plateau and early stopping, and which epoch each seed keeps.

Keras' ReduceLROnPlateau + EarlyStopping on the selection split's loss (:class:`PlateauTracker`),
and :func:`kept_epochs`: the epoch whose weights each seed reports and exports.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from lightflax.config import RunConfig


@dataclasses.dataclass
class PlateauTracker:
    """Per-seed Keras ReduceLROnPlateau + EarlyStopping on the selection split's loss.

    Keras semantics, per replica: a loss below the best so far is an improvement
    (resets both counters); otherwise after ``reduce_patience`` epochs the learning
    rate is multiplied by ``factor`` (and that counter restarts) and after
    ``stop_patience`` epochs the replica stops (its state is frozen as its best).
    Not ``optax.contrib.reduce_on_plateau``: that transform scales the updates
    inside the optimiser from losses fed to every update step, whereas the study
    (Keras callbacks) changes Adam's learning rate once per epoch from the
    validation loss, and early stopping shares the same counter.
    """

    num_seeds: int
    reduce_patience: int = 0  # 0 = off
    factor: float = 0.1
    stop_patience: int = 0  # 0 = off
    best_loss: List[float] = None
    best_epoch: List[int] = None
    since_best: List[int] = None
    since_lr_change: List[int] = None
    stopped: List[bool] = None

    def __post_init__(self):
        n = self.num_seeds
        for name, value in (("best_loss", math.inf), ("best_epoch", 0), ("since_best", 0),
                            ("since_lr_change", 0), ("stopped", False)):
            if getattr(self, name) is None:
                setattr(self, name, [value] * n)

    @property
    def all_stopped(self) -> bool:
        return all(self.stopped)

    def update(self, epoch: int, losses: np.ndarray, lrs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """After epoch ``epoch`` (1-based): returns (improved mask, new learning rates)."""
        lrs = np.array(lrs, dtype=float)
        improved = (np.asarray(losses) < np.array(self.best_loss)) & ~np.array(self.stopped)
        for r in range(self.num_seeds):
            if self.stopped[r]:
                continue
            if improved[r]:
                self.best_loss[r], self.best_epoch[r] = float(losses[r]), epoch
                self.since_best[r] = self.since_lr_change[r] = 0
                continue
            self.since_best[r] += 1
            self.since_lr_change[r] += 1
            if self.reduce_patience and self.since_lr_change[r] >= self.reduce_patience:
                lrs[r] *= self.factor
                self.since_lr_change[r] = 0
            if self.stop_patience and self.since_best[r] >= self.stop_patience:
                self.stopped[r] = True
        return improved, lrs

    def to_json(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("best_loss", "best_epoch", "since_best", "since_lr_change", "stopped")}


def from_config(cfg: RunConfig, saved: Optional[Dict[str, Any]] = None) -> PlateauTracker:
    """The run's tracker: fresh, or continued from a checkpoint's ``tracker`` entry (``to_json``)."""
    return PlateauTracker(cfg.num_seeds, cfg.reduce_lr_patience, cfg.reduce_lr_factor, cfg.early_stopping_patience,
                          **(saved or {}))


def kept_epochs(cfg: RunConfig, tracker: PlateauTracker, epochs_run: int) -> List[int]:
    """The epoch whose weights each replica reports and exports: its best (``keep="best"``) or its
    last (``keep="last"``: the epoch early stopping stopped it, best + patience, else the last run)."""
    if cfg.keep == "best":
        return list(tracker.best_epoch)
    return [min(b + cfg.early_stopping_patience, epochs_run) if stopped else epochs_run
            for b, stopped in zip(tracker.best_epoch, tracker.stopped)]
