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

from experiments import training

main = training.main  # configs/xray_transfer.py -> experiments/plan.py -> train
