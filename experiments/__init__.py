"""The entry layer: one module per experiment (run with ``python launch.py --experiment=NAME``)."""

import datetime
import os
from typing import Sequence


def default_workdir(experiment: str, tags: Sequence[str] = ()) -> str:
    """runs/<experiment>-<tags>-<UTC time> (e.g. runs/xray_light-k5-28px-20261130-061500): where a run
    goes without --workdir; the tags name what varies between runs (rank, input size)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", "-".join([experiment, *tags, stamp]))
