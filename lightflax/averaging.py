"""Weight averaging over epochs (``--weight_averaging``): the evaluated, selected and exported
weights are an average of the training weights at the ends of epochs, while training itself goes
on from the raw weights.

* ``ema``: an exponential moving average with per-epoch decay ``1 - 1 / averaging_epochs``
  (time constant ``averaging_epochs`` epochs), started at the first epoch's weights;
* ``swa``: the uniform mean of the weights at the ends of the last ``averaging_epochs`` epochs
  (stochastic weight averaging, Izmailov et al. 2018); before that window, the raw weights.

Both average every variable the model exports, parameters AND BatchNorm statistics (the running
statistics of the averaged weights are not recomputed; predict's ``--adapt_bn`` re-estimates them).
Works on any pytree of arrays, so the leading replica axis is averaged elementwise per replica.
"""

from __future__ import annotations

from typing import Any, Optional

import jax

MODES = ("none", "ema", "swa")


def weight(mode: str, epoch: int, epochs: int, window: int) -> float:
    """The weight of epoch ``epoch``'s (0-based) weights in the running average after it:
    ``average = (1 - w) * average + w * new``. 1.0 = the average restarts at the new weights."""
    if mode == "ema":
        return 1.0 if epoch == 0 else 1.0 / window
    if mode == "swa":
        start = max(0, epochs - window)
        return 1.0 if epoch <= start else 1.0 / (epoch - start + 1)
    raise ValueError(f"weight averaging must be one of {', '.join(MODES[1:])}, got {mode!r}")


def update(average: Optional[Any], new: Any, mode: str, epoch: int, epochs: int, window: int) -> Any:
    """The running average after epoch ``epoch`` (``average`` None: the first one)."""
    w = weight(mode, epoch, epochs, window)
    if average is None or w == 1.0:
        return jax.tree_util.tree_map(lambda n: n + 0, new)  # a copy: the step may donate ``new``
    return jax.tree_util.tree_map(lambda a, n: a + (n - a) * w, average, new)
