"""Scoring a finished run on an external npz:
python launch.py --experiment=predict --workdir=RUN_DIR --input_npz=IN.npz --output_npz=OUT.npz"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    c = ml_collections.ConfigDict()
    c.experiment = "predict"
    c.workdir = placeholder(str)  # the finished run
    c.input_npz = placeholder(str)
    c.output_npz = placeholder(str)
    c.seed_index = placeholder(int)  # None: the mean of every replica's probabilities
    c.explain = placeholder(str)  # occlusion | gradcam: also write heatmaps (docs/explain.md)
    c.explain_patch = placeholder(int)  # occlusion patch side (default: about min(H, W) / 7)
    c.explain_stride = placeholder(int)  # occlusion stride (default: patch // 2)
    c.explain_dir = placeholder(str)  # one overlay PNG per image
    # test-time adaptation (docs/robust.md); None: the run's stored predict_defaults, else off
    c.adapt_bn = placeholder(bool)  # BatchNorm statistics of all the input images (AdaBN)
    c.label_shift = placeholder(str)  # none | em: the class prior re-estimated from the predictions
    c.calibrate = placeholder(str)  # none | temperature: the run's validation-fitted temperature
    c.optimizer = ml_collections.ConfigDict(dict(batch_size=64))  # images per forward pass
    return c
