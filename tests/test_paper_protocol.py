"""keep="last" (--paper_protocol): the reported and exported weights are the last epoch's, as the
LightLayers reference's ModelCheckpoint (no save_best_only) left them."""

import json

import numpy as np
import pytest

from lightflax import plateau, train
from lightflax.config import RunConfig
from lightflax.data.types import DatasetSplits, Split
from lightflax.errors import UserError


def test_keep_last_reports_the_last_epoch(tmp_path):
    # random features and labels: the test loss rises as the model memorises the training split, so
    # the best test epoch is not the last one and keep="best" would report other figures
    rng = np.random.default_rng(0)
    splits = {s: Split(rng.normal(size=(n, 32)).astype(np.float32), rng.integers(0, 2, n))
              for s, n in (("train", 64), ("test", 64))}
    d = DatasetSplits("synthetic", True, 2, ["a", "b"], dict(splits, val=None))
    cfg = RunConfig.flat(workdir=str(tmp_path / "run"), model="linear_head", batch_size=16, epochs=3,
                    select_split="test", keep="last", learning_rate=0.1)
    r = train.train_and_evaluate(cfg, d)
    history = json.loads((tmp_path / "run" / "results.json").read_text())
    assert history["kept_checkpoint"] == "last" and history["kept_epoch"] == 3 and r["epochs_run"] == 3
    assert r["best_epoch"] != 3, "the data no longer make the best epoch differ from the last: pick another seed"
    # select_split=test: each history row holds that epoch's test figures
    rows = [row for row in _history(tmp_path / "run")]
    last, best = rows[-1], rows[r["best_epoch"] - 1]
    assert r["test_loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    assert r["test_accuracy"] == pytest.approx(last["test_accuracy"], abs=1e-9)
    assert r["test_loss"] != pytest.approx(best["test_loss"], rel=1e-6)


def _history(workdir):
    import csv

    with open(workdir / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.parametrize("keep,stopped,expected", [
    ("best", [False, False], [2, 5]),
    ("last", [False, False], [7, 7]),
    ("last", [True, False], [4, 7]),  # replica 0 stopped at its best (2) + patience (2)
])
def test_kept_epochs(keep, stopped, expected):
    cfg = RunConfig.flat(workdir="unused", model="xray_light", keep=keep, early_stopping_patience=2, num_seeds=2)
    tracker = plateau.PlateauTracker(2, stop_patience=2, best_epoch=[2, 5], stopped=stopped)
    assert plateau.kept_epochs(cfg, tracker, 7) == expected


def test_keep_is_checked():
    with pytest.raises(UserError, match="--keep must be one of best, last"):
        RunConfig.flat(workdir="unused", model="xray_light", keep="first")
