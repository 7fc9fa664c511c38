"""The study's Conv2D row on chest X-rays.

    python launch.py --experiment=xray_conv2d
    python launch.py --experiment=xray_conv2d --recipe=robust   # experiments/recipes.py
"""

from experiments import training

main = training.main  # configs/xray_conv2d.py -> experiments/plan.py -> train
