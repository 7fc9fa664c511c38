"""The speed study's sweep: python launch.py --experiment=speed_study --workdir=runs/speed"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    c = ml_collections.ConfigDict()
    c.experiment = "speed_study"
    c.workdir = placeholder(str)  # None: runs/speed_study-<UTC time>
    c.layers = True  # run the per-layer sweep
    c.sizes = "28,128,299"  # input resolutions of the layer sweep
    c.batches = "64"
    c.model = ml_collections.ConfigDict(dict(ks="1,3,5"))  # LightLayers ranks
    c.widths = "3:8,8:8,16:32"  # c_in:c_out pairs of the layer sweep
    c.modes = "fwd,fwd+bwd"
    c.kinds = placeholder(str)  # None: every layer variant of lightflax.speed.LAYER_KINDS
    c.models = "xray_light:5,xray_lowrank:5,xray_conv2d"  # whole models (name[:k])
    c.model_sizes = "128"
    c.rounds = 5
    c.runtime = ml_collections.ConfigDict(dict(dtype="float32", parallel="shard_map"))
    return c
