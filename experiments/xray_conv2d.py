"""The study's Conv2D row on chest X-rays.

    python launch.py --experiment=xray_conv2d
"""

from experiments import _common as common


def main(argv):
    del argv
    common.run_training("xray_conv2d", "xray_conv2d", {}, channels=3)
