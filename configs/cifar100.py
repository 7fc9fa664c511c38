"""The LightLayers paper's cifar100 experiment: python launch.py --experiment=cifar100 --method=light --k=3
(protocol defaults: experiments/cifar100.py's docstring)."""

from configs import _training


def get_config():
    return _training.paper("cifar100", "cifar", dataset="cifar100", channels=3, num_classes=100,
                           epochs=20, learning_rate=1e-4, image_size=32,
                           reduce_lr_patience=0, early_stopping_patience=0)
