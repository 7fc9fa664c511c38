"""The study's Conv2D row on chest X-rays.

    python launch.py --experiment=xray_conv2d
"""

from lightflax import experiment
from lightflax import flags as _common  # noqa: F401  (defines the common flags)


def main(argv):
    del argv
    experiment.run_training("xray_conv2d", "xray_conv2d", {}, channels=3)
