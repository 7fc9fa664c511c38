"""The study's third arm: a frozen ImageNet backbone + a linear head.

    python launch.py --experiment=xray_transfer --backbone=efficientnet_lite0 --dataset=pneumonia_mnist
    python launch.py --experiment=xray_transfer --backbone=inception_v3 --pretrained_path=W.h5

The features of each split are computed once (batched, jitted) and cached on
disk, keyed by backbone, weights hash, dataset, split and resolution; the head
then trains with the shared trainer for the protocol's epochs at a cost of
milliseconds per epoch. The report carries the study's columns: total params
(backbone + head), trainable params (the head), size on disk (backbone weights
+ head), accuracy, times (feature extraction reported apart).
"""

import os

from absl import flags

from lightflax import experiment
from lightflax import flags as _common  # noqa: F401  (defines the common flags)

BACKBONE = flags.DEFINE_enum("backbone", "inception_v3", ["inception_v3", "efficientnet_lite0"],
                             "ImageNet backbone (frozen).")
PRETRAINED_PATH = flags.DEFINE_string("pretrained_path", None, "Local weight file of the backbone.")
FEATURE_CACHE = flags.DEFINE_string("feature_cache_dir", None, "Feature cache (default: "
                                    "$LIGHTFLAX_CACHE_DIR/features or ~/.cache/lightflax/features).")


def run(backbone, data, workdir):
    """One transfer run on already loaded data (also used by xray_compare)."""
    from lightflax import transfer

    return transfer.run_transfer(backbone, data, workdir, pretrained_path=PRETRAINED_PATH.value,
                                 cache_dir=FEATURE_CACHE.value)


def main(argv):
    del argv
    experiment.maybe_initialize_distributed()
    data = experiment.load_data(num_classes=2, synthetic_shape=(64, 64, 1))
    run(BACKBONE.value, data, flags.FLAGS.workdir or experiment.default_workdir("xray_transfer"))
