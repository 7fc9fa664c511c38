"""The study's LightLayers (K = k) rows on chest X-rays.

    python launch.py --experiment=xray_light --k=5
    python launch.py --experiment=xray_light --k=5 --dataset=pneumonia_mnist --image_size=64
    python launch.py --experiment=xray_light --k=5 --recipe=robust

Defaults reproduce the study's protocol (Adam 1e-3, 20 epochs, batch 64, 299x299,
best checkpoint by validation loss, test at the end) with its flaws fixed
(BUILD_NOTES.md, docs/results.md). Without data it falls back to labelled synthetic data.
--recipe=robust sets the robust recipe's flags (experiments/_common.py RECIPES); flags
given on the command line override them.
"""

from absl import flags

from experiments import _common as common

common.define_recipe_flag()
K = flags.DEFINE_integer("k", 5, "LightLayers rank K.", lower_bound=1)


def main(argv):
    del argv
    common.apply_recipe("xray_light")
    common.run_training("xray_light", "xray_light", {"k": K.value}, channels=3)
