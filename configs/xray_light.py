"""The study's LightLayers (K = k) rows on chest X-rays: python launch.py --experiment=xray_light --k=5"""

from configs import _training


def get_config():
    c = _training.get_config("xray_light", "xray_light")
    c.model.k = 5  # LightLayers rank K
    c.model.channels = 3
    c.model.se_ratio = 0.0  # squeeze-and-excitation bottleneck ratio per block (0: off, the study's model)
    c.recipe = "study"  # study | robust | shift (experiments/recipes.py)
    return c
