"""The study's third arm: a frozen ImageNet backbone + a linear head.

    python launch.py --experiment=xray_transfer --backbone=efficientnet_lite0 --dataset=pneumonia_mnist
    python launch.py --experiment=xray_transfer --backbone=inception_v3 --pretrained_path=W.h5
    python launch.py --experiment=xray_transfer --backbone=efficientnet_lite0 --finetune_blocks=2
    python launch.py --experiment=xray_transfer --backbone=se_resnet50 --pretrained_path=se_resnet50-ce0d4300.pth

The features of each split are computed once (batched, jitted) and cached on
disk, keyed by backbone, weights hash, dataset, split and resolution; the head
then trains with the shared trainer for the protocol's epochs at a cost of
milliseconds per epoch. --finetune_blocks=N adds the second stage of the
two-stage recipe: the last N blocks are unfrozen and trained with the head at
a lower learning rate, fed with the cached activations of the frozen trunk
(the backbone's BatchNorm stays in inference mode). The report carries the study's columns: total params
(backbone + head), trainable params (the head), size on disk (backbone weights
+ head), accuracy, times (feature extraction reported apart).

--recipe=robust applies the recipe's knobs that a head on cached features can use
(dropout before the head, class weighting, the schedule, epochs, seeds, the decision
rule) and SKIPS --augment, with a console line and ``recipe_skipped`` in results.json:
the features are computed once from the stored images, so there is nothing to augment
per step (an explicit --augment is likewise not applied to cached features). With
--finetune_blocks > 0 the recipe's --num_seeds is skipped too (stage 2 needs one seed).
"""


from absl import flags

from experiments import _common as common
from experiments import default_workdir
from lightflax import pretrained

common.define_recipe_flag()

BACKBONE = flags.DEFINE_enum("backbone", "inception_v3", pretrained.names(),
                             "ImageNet backbone (frozen); docs/backbones.md lists them.")
PRETRAINED_PATH = flags.DEFINE_string("pretrained_path", None, "Local weight file of the backbone.")
FINETUNE_BLOCKS = flags.DEFINE_integer(
    "finetune_blocks", 0, "Stage 2: unfreeze the backbone's last N blocks (0 = head only) and train them with the "
    "head at --finetune_learning_rate on cached trunk activations.", lower_bound=0)
FINETUNE_EPOCHS = flags.DEFINE_integer("finetune_epochs", 10, "Epochs of stage 2 (--finetune_blocks > 0).",
                                       lower_bound=1)
FINETUNE_LR = flags.DEFINE_float("finetune_learning_rate", 1e-5, "Learning rate of stage 2 (lower than stage 1's).",
                                 lower_bound=0.0)
FEATURE_CACHE = flags.DEFINE_string("feature_cache_dir", None, "Feature cache (default: "
                                    "$LIGHTFLAX_CACHE_DIR/features or ~/.cache/lightflax/features).")


def run(backbone, data, workdir=None):
    """One transfer run on already loaded data (also used by xray_compare)."""
    from lightflax import transfer

    cfg = common.build_config("xray_transfer", "linear_head", {}, data, channels=3, workdir=workdir)
    return transfer.run_transfer(backbone, data, cfg, pretrained_path=PRETRAINED_PATH.value,
                                 cache_dir=FEATURE_CACHE.value, finetune_blocks=FINETUNE_BLOCKS.value,
                                 finetune_epochs=FINETUNE_EPOCHS.value,
                                 finetune_learning_rate=FINETUNE_LR.value,
                                 extra=common.flags_record("xray_transfer"))


def main(argv):
    del argv
    skip = {"augment": "cached backbone features are not augmented"}
    if FINETUNE_BLOCKS.value:
        skip["num_seeds"] = "--finetune_blocks needs one seed"
    common.apply_recipe("xray_transfer", skip=skip)
    common.initialize_distributed()
    common.configure_output()
    name, note = common.resolve_dataset()
    workdir = flags.FLAGS.workdir or default_workdir("xray_transfer", [BACKBONE.value])
    common.check_workdir(workdir)
    with common.no_empty_folder_on_error(workdir):
        data = common.load_data(num_classes=2, synthetic_shape=(64, 64, 1), name=name, note=note)
        run(BACKBONE.value, data, workdir)
