"""The entry layer: one module per experiment (run with ``python launch.py --experiment=NAME``)."""

import datetime
import os


def default_workdir(experiment: str) -> str:
    """runs/<experiment>-<UTC time>: where a run goes without --workdir."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{experiment}-{stamp}")
