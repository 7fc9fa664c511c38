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

import numpy as np

from experiments import concurrent_rows, plan as plan_lib, training
from lightflax import explain, files, progress, report, tables, train
from lightflax.errors import UserError


def main(config, explicit=frozenset()):
    compilation_cache()
    training.configure(config)
    plan = plan_lib.resolve(config, explicit)
    workers = max(1, min(int(config.runtime.get("concurrent_rows", 1)), len(plan.rows)))
    with training.no_empty_folder_on_error(plan.workdir):
        study = progress.Study([(_label(row), _steps(row.run)) for row in plan.rows], workers=workers)
        _compare(plan, training.load(plan), study)


def compilation_cache() -> str:
    """JAX's persistent compilation cache for the study: $JAX_COMPILATION_CACHE_DIR when set, else the
    user cache's lightflax/jax (files.cache_dir). The rows' programs differ in shape, so a cold study
    gets no hit from it (measured: 0 of 392 lookups); a repeated study skips XLA's compilation (the
    train step's 6-7 s per row under load down to 0.3-1.2 s, tracing and lowering remain)."""
    import jax

    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or files.cache_dir("jax")
    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # every program (as measured), not >= 1 s
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder


def _label(row) -> str:
    return row.label if row.run.transfer else f"{row.label} ({row.run.image_size} px)"


def _steps(run, data=None) -> int:
    """The row's training steps (its epochs x steps per epoch), the weight of its ETA; before the data
    is loaded every row counts one step per epoch."""
    n = len(data.splits["train"].labels) // run.batch_size if data is not None else 1
    return run.epochs * (min(n, run.steps_per_epoch) if run.steps_per_epoch else n)


def _spreads(result):
    """The selection split's per-replica prediction spreads (tables.prediction_spreads) of a finished row."""
    path = os.path.join(result["config"]["workdir"], train.PREDICTIONS_FILE)
    with np.load(path) as z:
        return tables.prediction_spreads(z[f"{result.get('select_split', 'val')}_log_probs"])


def _train_one(plan, data, study, i):
    """Row i trained (its results.json content), or the UserError of a transfer row that cannot run."""
    row = plan.rows[i]
    study.start(i)
    try:
        r = training.train_row(plan, row, data)
    except UserError as e:
        if row.run.transfer is None:
            raise
        study.done(i, skipped=True)
        return e
    study.done(i)
    return r


def _train_rows(plan, data, study):
    """(results, labels, notes) of every row, each with its wall time (``row_wall_s``) and prediction
    spread; a transfer row that cannot run is reported as skipped. With ``study.workers`` > 1 the rows
    train that many at a time (experiments/concurrent_rows.py) and a note says their times are contended."""
    results, labels, notes = [], [], [n for n in (plan.note, *plan.comparison_notes) if n]
    study.steps = [_steps(row.run, data) for row in plan.rows]
    n = len(plan.rows)
    if study.workers > 1:
        outcomes = concurrent_rows.run(lambda i: _train_one(plan, data, study, i), n, study.workers,
                                       [row.label for row in plan.rows])
        notes.append(CONTENDED_NOTE.format(n=study.workers))
    else:
        outcomes = [_train_one(plan, data, study, i) for i in range(n)]
    for i, (row, r) in enumerate(zip(plan.rows, outcomes)):
        if isinstance(r, UserError):
            notes.append(f"transfer row skipped: {str(r).splitlines()[0]}")
            continue
        results.append(dict(r, row_wall_s=study.wall_s[i], prediction_spread=_spreads(r)))
        labels.append(_label(row))
    return results, labels, notes


CONTENDED_NOTE = ("rows trained {n} at a time (--concurrent_rows={n}, one native thread per call): wall s, total s "
                  "and s/epoch were measured with another row training beside each row (contended; their ratios "
                  "depend on what ran beside). Uncontended per-row times: --concurrent_rows=1")


def _compare(plan, data, study):
    workdir, run = plan.workdir, plan.rows[0].run
    results, labels, notes = _train_rows(plan, data, study)
    table = tables.comparison_rows(results, labels)
    split = table[0]["figure_split"]
    n_split = (data.splits.get(split).labels.shape[0] if data.splits.get(split) is not None else 0)
    dataset = f"{data.name}{' (SYNTHETIC)' if data.synthetic else ''}"
    header = (f"dataset: {dataset} ({data.source or 'generated'}); accuracy/AUC figures on the {split} split "
              f"({n_split} images){'; test columns are null: no test split' if split != 'test' else ''}; "
              f"batch {run.batch_size}; epochs {run.epochs}; seeds {run.num_seeds}")
    title = f"xray_compare: {dataset}, {split} split" + (", times contended" if study.workers > 1 else "")
    tables.comparison_figure(os.path.join(workdir, "comparison.png"), table, title, synthetic=data.synthetic)
    tables.comparison_bar_charts(os.path.join(workdir, "comparison"), table, title=f"{dataset}, {split}",
                                 synthetic=data.synthetic)
    grid = explain.comparison_grid(os.path.join(workdir, "explanations.png"), results, labels, data)
    total = study.finish()
    header += (f"; study wall time {total:.1f} s (data loading, every row, figures and explanation grid; "
               f"rows: {', '.join(f'{w:.1f}' for w in study.wall_s if w is not None)} s)")
    md = tables.comparison_markdown(table, note="\n".join([header] + [f"- {n}" for n in notes]))
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(md)
    report.write_json(os.path.join(workdir, "comparison.json"), {
        "rows": table, "notes": notes, "synthetic": data.synthetic, "dataset": data.name, "figure_split": split,
        "study_wall_s": total, "rows_wall_s": sum(w for w in study.wall_s if w is not None),
        "time_columns": tables.TIME_COLUMNS_NOTE})
    print(md)
    print(grid, flush=True)
