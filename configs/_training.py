"""The sections every training experiment shares; defaults are the seed study's protocol.

Sections follow lightflax.config.RunConfig: model, data, optimizer, schedule, callbacks, runtime
(and transfer for the transfer-learning experiments). None (a placeholder) means "the plan
chooses": experiments/plan.py says how.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(experiment: str, model: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = experiment
    c.workdir = placeholder(str)  # None: runs/<experiment>-<tags>-<UTC time> (experiments/plan.py)
    c.model = ml_collections.ConfigDict(dict(
        name=model,
        impl=placeholder(str),  # conv | einsum; None: the layer's default (conv)
        dropout=0.0,  # before the head
        l2=placeholder(float),  # None: the model's reference L2 (LightLayers: 1e-4, else 0)
    ))
    c.data = ml_collections.ConfigDict(dict(
        dataset=placeholder(str),  # None: chest_xray, or the embedded PneumoniaMNIST when its folders are absent
        data_dir=placeholder(str),
        manual_dir=placeholder(str),
        image_size=placeholder(int),  # None: 299 on chest_xray; on PneumoniaMNIST the smallest size that fits
        eval_image_size=placeholder(int),
        augment="none",
        mixup=0.0,  # mixup's alpha (lightflax.data.mixup); 0: off
        mean_subtraction=False,
        synthetic_size=128,
        on_corrupt="skip",
    ))
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, batch_size=64, class_weighting="none"))
    c.schedule = ml_collections.ConfigDict(dict(
        epochs=20, lr_schedule="constant", warmup_epochs=0, steps_per_epoch=placeholder(int),
        weight_averaging="none", averaging_epochs=5))
    c.callbacks = ml_collections.ConfigDict(dict(
        select_split="val", early_stopping_patience=0, reduce_lr_patience=0, reduce_lr_factor=0.1,
        decision="argmax"))
    c.runtime = ml_collections.ConfigDict(dict(
        seed=0, num_seeds=1, replica_mode="vmap", parallel="shard_map", dtype="float32", kernels="native",
        resume=False, checkpoint_every=1, progress="auto", profile=False, profile_dir=placeholder(str), profile_start_step=3,
        profile_steps=3, coordinator_address=placeholder(str), num_processes=placeholder(int),
        process_id=placeholder(int)))
    return c


def transfer_section(**defaults) -> ml_collections.ConfigDict:
    """Settings of the transfer-learning row: a frozen ImageNet backbone + a linear head."""
    return ml_collections.ConfigDict(dict(dict(
        backbone="inception_v3", pretrained_path=placeholder(str), feature_cache_dir=placeholder(str),
        finetune_blocks=0, finetune_epochs=10, finetune_learning_rate=1e-5), **defaults))


def paper(experiment: str, family: str, *, dataset: str, channels: int, num_classes: int, epochs: int,
          learning_rate: float, image_size: int, reduce_lr_patience: int = 0,
          early_stopping_patience: int = 0) -> ml_collections.ConfigDict:
    """The LightLayers paper's experiments: --method=conv2d|separable|light, --k, --paper_protocol."""
    c = get_config(experiment, None)
    c.model.name = placeholder(str)  # None: <family>_<method> (mnist_light, cifar_conv2d, ...)
    c.model.family = family
    c.model.method = "light"
    c.model.k = 1
    c.model.channels = channels
    c.model.num_classes = num_classes
    c.data.dataset = dataset
    c.data.image_size = image_size
    c.schedule.epochs = epochs
    c.optimizer.learning_rate = learning_rate
    c.callbacks.reduce_lr_patience = reduce_lr_patience
    c.callbacks.early_stopping_patience = early_stopping_patience
    c.paper_protocol = False
    return c
