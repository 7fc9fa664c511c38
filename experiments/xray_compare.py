"""The study's comparison in one go: LightLayers K=1..5, Conv2D (and transfer).

    python launch.py --experiment=xray_compare
    python launch.py --experiment=xray_compare --dataset=pneumonia_mnist --image_size=64 --num_seeds=3

Each row trains into <workdir>/<row>/ with the shared protocol; the comparison
is written as <workdir>/comparison.md (the study's table), comparison.json and
one bar chart per column (<workdir>/comparison_<column>.png). The transfer row
(--transfer_backbone, frozen backbone + linear head) is added when its
pretrained weights are available, and reported as skipped otherwise.
"""

import os

from absl import flags

from experiments import xray_transfer  # defines --pretrained_path, --feature_cache_dir
from experiments import _common as common
from lightflax import report

KS = flags.DEFINE_list("ks", ["1", "2", "3", "4", "5"], "LightLayers ranks to compare.")
TRANSFER = flags.DEFINE_enum("transfer_backbone", "inception_v3", ["none", "inception_v3", "efficientnet_lite0"],
                             "Backbone of the transfer-learning row ('none' to skip it).")

FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:
        ks = [int(k) for k in KS.value]
    except ValueError:
        raise common.UserError(f"--ks must be a comma-separated list of integers, got {KS.value}") from None
    if any(k < 1 for k in ks):
        raise common.UserError(f"--ks values must be >= 1, got {KS.value}")
    workdir = FLAGS.workdir or common.default_workdir("xray_compare")
    data = common.load_data(num_classes=2, synthetic_shape=(FLAGS.image_size, FLAGS.image_size, 1))
    rows, labels = [], []
    for k in ks:
        rows.append(common.run_training("xray_compare", "xray_light", {"k": k}, channels=3, data=data,
                                            workdir=os.path.join(workdir, f"light_k{k}")))
        labels.append(f"LightLayers K={k}")
    rows.append(common.run_training("xray_compare", "xray_conv2d", {}, channels=3, data=data,
                                        workdir=os.path.join(workdir, "conv2d")))
    labels.append("Conv2D")
    notes = []
    if TRANSFER.value != "none":
        try:
            rows.append(xray_transfer.run(TRANSFER.value, data, os.path.join(workdir, "transfer")))
            labels.append(f"transfer ({TRANSFER.value})")
        except common.UserError as e:
            notes.append(f"transfer row skipped: {str(e).splitlines()[0]}")
    table = report.comparison_rows(rows, labels)
    header = (f"dataset: {data.name}{' (SYNTHETIC)' if data.synthetic else ''}; "
              f"image size {FLAGS.image_size}; batch {FLAGS.batch_size}; epochs {FLAGS.epochs}; "
              f"seeds {FLAGS.num_seeds}")
    md = report.comparison_markdown(table, note="\n".join([header] + notes))
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(md)
    report.write_json(os.path.join(workdir, "comparison.json"), {"rows": table, "notes": notes,
                                                                "synthetic": data.synthetic})
    report.comparison_bar_charts(os.path.join(workdir, "comparison"), table)
    print(md)
