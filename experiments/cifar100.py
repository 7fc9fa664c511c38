"""The LightLayers paper's Table 4 (CIFAR-100, residual, filters 16/32/64).

    python launch.py --experiment=cifar100 --method=conv2d

Adam 1e-4, 20 epochs, batch 64. Without TensorFlow (TFDS catalog) the run falls
back to labelled synthetic data.
"""

from experiments import _common as common

common.define_paper_flags(dataset="cifar100", epochs=20, learning_rate=1e-4, image_size=32)


def main(argv):
    del argv
    common.run_paper("cifar100", family="cifar", channels=3, num_classes=100)
