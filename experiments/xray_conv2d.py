"""The study's Conv2D row on chest X-rays.

    python launch.py --experiment=xray_conv2d
    python launch.py --experiment=xray_conv2d --recipe=robust   # RECIPES in experiments/_common.py
"""

from experiments import _common as common

common.define_recipe_flag()


def main(argv):
    del argv
    common.apply_recipe("xray_conv2d")
    common.run_training("xray_conv2d", "xray_conv2d", {}, channels=3)
