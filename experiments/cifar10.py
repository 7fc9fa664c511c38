"""The LightLayers paper's CIFAR-10 models (residual, filters 16/32/64).

    python launch.py --experiment=cifar10 --method=light --k=3

CIFAR comes through the TFDS catalog (needs TensorFlow); without it the run
falls back to labelled synthetic data. Adam 1e-4, 20 epochs, batch 64.
"""

from experiments import _common as common

common.define_paper_flags(dataset="cifar10", epochs=20, learning_rate=1e-4, image_size=32)


def main(argv):
    del argv
    common.run_paper("cifar10", family="cifar", channels=3, num_classes=10)
