"""The study's Conv2D row on chest X-rays: python launch.py --experiment=xray_conv2d"""

from configs import _training


def get_config():
    c = _training.get_config("xray_conv2d", "xray_conv2d")
    c.model.channels = 3
    c.model.se_ratio = 0.0  # squeeze-and-excitation bottleneck ratio per block (0: off, the study's model)
    c.recipe = "study"  # study | robust | shift (experiments/recipes.py)
    return c
