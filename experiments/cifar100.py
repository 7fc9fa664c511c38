"""The LightLayers paper's Table 4 (CIFAR-100, residual, filters 16/32/64).

    python launch.py --experiment=cifar100 --method=conv2d

Adam 1e-4, 20 epochs, batch 64. Without TensorFlow (TFDS catalog) the run falls
back to labelled synthetic data.
"""

from experiments import training

main = training.main  # configs/cifar100.py -> experiments/plan.py -> train
