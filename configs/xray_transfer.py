"""The study's third arm, a frozen ImageNet backbone + a linear head:
python launch.py --experiment=xray_transfer --backbone=efficientnet_lite0 --dataset=pneumonia_mnist"""

from configs import _training


def get_config():
    c = _training.get_config("xray_transfer", "linear_head")
    c.model.channels = 3
    c.transfer = _training.transfer_section()
    c.recipe = "study"  # study | robust | shift (experiments/recipes.py)
    return c
