"""The LightLayers paper's fashion_mnist experiment: python launch.py --experiment=fashion_mnist --method=light --k=3
(protocol defaults: experiments/fashion_mnist.py's docstring)."""

from configs import _training


def get_config():
    return _training.paper("fashion_mnist", "mnist", dataset="fashion_mnist", channels=1, num_classes=10,
                           epochs=10, learning_rate=1e-3, image_size=28,
                           reduce_lr_patience=3, early_stopping_patience=10)
