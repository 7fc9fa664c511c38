"""The LightLayers paper's mnist experiment: python launch.py --experiment=mnist --method=light --k=3
(protocol defaults: experiments/mnist.py's docstring)."""

from configs import _training


def get_config():
    return _training.paper("mnist", "mnist", dataset="mnist", channels=1, num_classes=10,
                           epochs=10, learning_rate=1e-3, image_size=28,
                           reduce_lr_patience=4, early_stopping_patience=10)
