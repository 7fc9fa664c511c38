"""The LightLayers paper's CIFAR-10 models (residual, filters 16/32/64).

    python launch.py --experiment=cifar10 --method=light --k=3

CIFAR comes through the TFDS catalog (needs TensorFlow); without it the run
falls back to labelled synthetic data. Adam 1e-4, 20 epochs, batch 64.
"""

from experiments import training

main = training.main  # configs/cifar10.py -> experiments/plan.py -> train
