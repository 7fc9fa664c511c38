"""The study's comparison in one go: LightLayers K=1..5, Conv2D (and transfer).

    python launch.py --experiment=xray_compare
    python launch.py --experiment=xray_compare --dataset=pneumonia_mnist --image_size=64 --num_seeds=3

Each row trains into <workdir>/<row>/ with the shared protocol; the comparison
is written as <workdir>/comparison.md (the study's table, with ROC AUC,
sensitivity/specificity and the majority-class baseline), comparison.json, one
combined figure (<workdir>/comparison.png: accuracy, ROC AUC, parameters, size
in KB, s/epoch, every bar labelled) and one bar chart per column
(<workdir>/comparison_<column>.png), and <workdir>/explanations.png (a few
validation X-rays of each class by model: Grad-CAM, occlusion for the transfer
row). Every row's input size is checked before anything is trained; without
--image_size each row gets a size that fits it (on PneumoniaMNIST: 28 for
LightLayers, 64 for Conv2D). The transfer row (--transfer_backbone, frozen
backbone + linear head) uses EfficientNet-Lite0
(offline weights) when InceptionV3's weights are not on disk, and is reported
as skipped when neither is available.
"""

import os

from absl import flags

from experiments import default_workdir, xray_transfer  # xray_transfer defines --pretrained_path, ...
from experiments import _common as common
from lightflax import explain, report

KS = flags.DEFINE_list("ks", ["1", "2", "3", "4", "5"], "LightLayers ranks to compare.")
TRANSFER = flags.DEFINE_enum("transfer_backbone", "inception_v3", ["none", "inception_v3", "efficientnet_lite0"],
                             "Backbone of the transfer-learning row ('none' to skip it; InceptionV3 falls back "
                             "to EfficientNet-Lite0 when its weights are not on disk).")

FLAGS = flags.FLAGS


def _ranks():
    try:
        ks = [int(k) for k in KS.value]
    except ValueError:
        raise common.UserError(f"--ks must be a comma-separated list of integers, got {KS.value}") from None
    if not ks or any(k < 1 for k in ks):
        raise common.UserError(f"--ks values must be >= 1, got {KS.value}")
    return ks


def _transfer_backbone():
    """(backbone or None, note or None), without downloading anything."""
    from lightflax import pretrained
    from lightflax.pretrained import download, inception_v3

    choice = TRANSFER.value
    if choice == "none":
        return None, None
    if xray_transfer.PRETRAINED_PATH.value or choice == "efficientnet_lite0":
        return choice, None
    if download.find_file(inception_v3.WEIGHTS[False][0], download.weights_dirs()):
        return choice, None
    try:
        pretrained.find_weights("efficientnet_lite0")
    except common.UserError:
        return choice, None  # the row then says why it was skipped
    return "efficientnet_lite0", ("transfer row: InceptionV3 weights not found on disk; using EfficientNet-Lite0 "
                                  "(offline weights) instead")


def plan(ks, dataset):
    """[(label, subfolder, model, kwargs, size)] of every row, each size checked before any work."""
    rows = [(f"LightLayers K={k}", f"light_k{k}", "xray_light", {"k": k}) for k in ks]
    rows.append(("Conv2D", "conv2d", "xray_conv2d", {}))
    out = []
    for label, sub, model, kwargs in rows:
        size = common.fitting_image_size(model, kwargs, dataset)
        common.check_image_size(label, model, kwargs, size)
        out.append((label, sub, model, kwargs, size))
    return out


def main(argv):
    del argv
    common.configure_output()
    ks = _ranks()
    name, note = common.resolve_dataset()
    rows = plan(ks, name)
    sizes = sorted({r[-1] for r in rows})
    workdir = FLAGS.workdir or default_workdir("xray_compare", ["-".join(f"{s}px" for s in sizes)])
    common.check_workdir(workdir)
    backbone, transfer_note = _transfer_backbone()
    with common.no_empty_folder_on_error(workdir):
        data = common.load_data(num_classes=2, synthetic_shape=(sizes[-1], sizes[-1], 1), name=name, note=note)
        _compare(workdir, data, rows, backbone, [n for n in (note, transfer_note) if n])


def _compare(workdir, data, plan_rows, backbone, notes):
    results, labels = [], []
    for label, sub, model, kwargs, size in plan_rows:
        results.append(common.run_training("xray_compare", model, kwargs, channels=3, data=data, label=label,
                                           workdir=os.path.join(workdir, sub), image_size=size))
        labels.append(f"{label} ({size} px)")
    if backbone:
        try:
            results.append(xray_transfer.run(backbone, data, os.path.join(workdir, "transfer")))
            labels.append(f"transfer ({backbone})")
        except common.UserError as e:
            notes.append(f"transfer row skipped: {str(e).splitlines()[0]}")
    table = report.comparison_rows(results, labels)
    split = table[0]["figure_split"]
    n_split = (data.splits.get(split).labels.shape[0] if data.splits.get(split) is not None else 0)
    dataset = f"{data.name}{' (SYNTHETIC)' if data.synthetic else ''}"
    header = (f"dataset: {dataset} ({data.source or 'generated'}); accuracy/AUC figures on the {split} split "
              f"({n_split} images){'; test columns are null: no test split' if split != 'test' else ''}; "
              f"batch {FLAGS.batch_size}; epochs {FLAGS.epochs}; seeds {FLAGS.num_seeds}")
    md = report.comparison_markdown(table, note="\n".join([header] + [f"- {n}" for n in notes]))
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(md)
    report.write_json(os.path.join(workdir, "comparison.json"), {"rows": table, "notes": notes,
                                                                "synthetic": data.synthetic, "dataset": data.name,
                                                                "figure_split": split})
    title = f"xray_compare: {dataset}, {split} split"
    report.comparison_figure(os.path.join(workdir, "comparison.png"), table, title, synthetic=data.synthetic)
    report.comparison_bar_charts(os.path.join(workdir, "comparison"), table, title=f"{dataset}, {split}",
                                 synthetic=data.synthetic)
    print(md)
    print(explain.comparison_grid(os.path.join(workdir, "explanations.png"), results, labels, data), flush=True)
