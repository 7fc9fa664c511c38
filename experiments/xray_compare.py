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

from experiments import plan as plan_lib, training
from lightflax import explain, report, tables
from lightflax.errors import UserError


def main(config, explicit=frozenset()):
    training.configure(config)
    plan = plan_lib.resolve(config, explicit)
    with training.no_empty_folder_on_error(plan.workdir):
        _compare(plan, training.load(plan))


def _train_rows(plan, data):
    """(results, labels, notes) of every row; a transfer row that cannot run is reported as skipped."""
    results, labels, notes = [], [], [n for n in (plan.note, *plan.comparison_notes) if n]
    for row in plan.rows:
        try:
            results.append(training.train_row(plan, row, data))
        except UserError as e:
            if row.run.transfer is None:
                raise
            notes.append(f"transfer row skipped: {str(e).splitlines()[0]}")
            continue
        labels.append(row.label if row.run.transfer else f"{row.label} ({row.run.image_size} px)")
    return results, labels, notes


def _compare(plan, data):
    workdir, run = plan.workdir, plan.rows[0].run
    results, labels, notes = _train_rows(plan, data)
    table = tables.comparison_rows(results, labels)
    split = table[0]["figure_split"]
    n_split = (data.splits.get(split).labels.shape[0] if data.splits.get(split) is not None else 0)
    dataset = f"{data.name}{' (SYNTHETIC)' if data.synthetic else ''}"
    header = (f"dataset: {dataset} ({data.source or 'generated'}); accuracy/AUC figures on the {split} split "
              f"({n_split} images){'; test columns are null: no test split' if split != 'test' else ''}; "
              f"batch {run.batch_size}; epochs {run.epochs}; seeds {run.num_seeds}")
    md = tables.comparison_markdown(table, note="\n".join([header] + [f"- {n}" for n in notes]))
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(md)
    report.write_json(os.path.join(workdir, "comparison.json"), {"rows": table, "notes": notes,
                                                                "synthetic": data.synthetic, "dataset": data.name,
                                                                "figure_split": split})
    title = f"xray_compare: {dataset}, {split} split"
    tables.comparison_figure(os.path.join(workdir, "comparison.png"), table, title, synthetic=data.synthetic)
    tables.comparison_bar_charts(os.path.join(workdir, "comparison"), table, title=f"{dataset}, {split}",
                                 synthetic=data.synthetic)
    print(md)
    print(explain.comparison_grid(os.path.join(workdir, "explanations.png"), results, labels, data), flush=True)
