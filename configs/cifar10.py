"""The LightLayers paper's cifar10 experiment: python launch.py --experiment=cifar10 --method=light --k=3
(protocol defaults: experiments/cifar10.py's docstring)."""

from configs import _training


def get_config():
    return _training.paper("cifar10", "cifar", dataset="cifar10", channels=3, num_classes=10,
                           epochs=20, learning_rate=1e-4, image_size=32,
                           reduce_lr_patience=0, early_stopping_patience=0)
