"""What a new user reads and gets: the README's main command on the embedded real X-rays (few
steps), its console lines, progress bars, results.json, figures and TensorBoard events; the
up-front checks; the comparison's table and figure; lightflax.tables on one run folder."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import run_launch, run_python
from lightflax import native, report, tensorboard, tables

FEW = ["--epochs=2", "--steps_per_epoch=3", "--batch_size=16"]


def no_data_env(tmp_path):
    """A machine without the study's folders or any cached data (the embedded copy is all there is)."""
    return {"LIGHTFLAX_DATA_DIR": str(tmp_path / "no-data"), "LIGHTFLAX_SHARED_DIR": str(tmp_path / "no-shared"),
            "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """python launch.py --experiment=xray_light --k=5 (a few steps, bars forced as on a terminal)."""
    tmp = tmp_path_factory.mktemp("main")
    proc = run_launch(["--experiment=xray_light", "--k=5", *FEW, "--progress=bars"], env=no_data_env(tmp),
                      cwd=tmp, check=0)
    runs = list((tmp / "runs").iterdir())
    return proc, runs


def test_main_command_trains_on_the_embedded_real_xrays_and_says_so_once(main_run):
    proc, runs = main_run
    lines = [ln for ln in proc.stdout.splitlines() if "embedded real PneumoniaMNIST" in ln]
    assert len(lines) == 1 and lines[0].startswith("data: no chest_xray folder found")
    assert "SYNTHETIC" not in proc.stdout + proc.stderr
    assert len(runs) == 1 and re.fullmatch(r"xray_light-k5-28px-\d{8}-\d{6}", runs[0].name)
    r = json.loads((runs[0] / "results.json").read_text())
    assert r["dataset"]["name"] == "pneumonia_mnist" and r["synthetic"] is False
    assert r["dataset"]["splits"] == {"train": 4708, "val": 524, "test": None}
    assert r["data_default"] == lines[0] and r["notes"][0] == lines[0]
    assert r["config"]["image_size"] == 28


def test_main_command_shows_progress_and_ends_with_the_figures_a_user_wants(main_run):
    proc, runs = main_run
    out = proc.stdout
    # tqdm bars: description, steps/s, ETA ("<") and the running loss, for training and evaluation
    assert re.search(r"epoch 1/2: .*3/3 \[[0-9:]+<[0-9:]+, +[0-9.]+step/s, loss \d\.\d{4}\]", out), out[-2000:]
    assert re.search(r"eval: .*batch/s", out)
    assert "epoch 2/2  " in out  # the per-epoch line
    last = [ln for ln in out.splitlines() if ln.startswith("wrote ")][-1]
    assert re.search(r"val_accuracy=0\.\d{4} val_roc_auc=0\.\d{4} no test split time_per_epoch_s=\d+\.\d\d", last)


def test_main_command_results_json(main_run):
    _, runs = main_run
    r = json.loads((runs[0] / "results.json").read_text())
    for key in ("total_params", "trainable_params", "size_bytes", "time_per_epoch_s", "compile_time_s",
                "images_per_s", "select_metrics", "majority_baseline", "memory", "flags", "data_default"):
        assert key in r, key
    assert {"loss", "accuracy", "sensitivity", "specificity", "roc_auc", "balanced_accuracy", "ece",
            "target_prior_accuracy"} <= set(r["select_metrics"])  # 2 classes: the shift proxies too
    assert not [k for k in r["select_metrics"] if k.endswith("_std")]  # one seed: no spread
    assert not [k for k in r if k.endswith("_std")]
    assert r["majority_baseline"]["val"] == pytest.approx(390 / 524, abs=0.01)
    assert r["memory"]["process_peak_rss_bytes"] > 10 ** 7 and "peak_bytes" not in r["memory"]
    assert "logtostderr" not in r["flags"] and "verbosity" not in r["flags"] and r["flags"]["k"] == 5
    # which kernels ran, and why: native by default where the library is built (--kernels=xla keeps XLA's)
    assert r["kernels"]["kernels"] == ("native" if native.available() else "xla") and r["kernels"]["reason"]


def test_main_command_figures_and_tensorboard(main_run):
    _, runs = main_run
    with Image.open(runs[0] / "curves.png") as im:
        assert im.size == (1000, 430)
    scalars = tensorboard.read_scalars(str(runs[0]))
    for tag in ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "val/roc_auc", "learning_rate",
                "step_time_s", "images_per_s"):
        assert [s for s, _ in scalars[tag]] == [3, 6], tag
    history = (runs[0] / "history.csv").read_text().splitlines()
    assert float(history[1].split(",")[3]) == pytest.approx(scalars["val/loss"][0][1], rel=1e-6)


# Without a terminal (one line per epoch) and --verbosity=-2 (none): tests/test_experiments.py's runs.


@pytest.mark.parametrize("args,message", [
    (["--experiment=xray_light", "--manual_dir={tmp}/typo"], "holds no chest_xray data"),
    (["--experiment=xray_light", "--dataset=pneumonia_mnist", "--manual_dir={tmp}"], "--manual_dir applies to"),
    (["--experiment=xray_light", "--dataset=pneumonia_mnist", "--data_dir={tmp}/typo"], "holds no pneumonia_mnist"),
    (["--experiment=xray_compare", "--dataset=pneumonia_mnist", "--image_size=28"],
     "--image_size=28 is too small for Conv2D"),
    (["--experiment=xray_conv2d", "--image_size=28"], "too small for xray_conv2d"),
    (["--experiment=xray_light", "--workdir={tmp}/a_file"], "is an existing file"),
])
def test_bad_input_stops_before_any_work_and_leaves_no_folder(tmp_path, args, message):
    (tmp_path / "a_file").write_text("x")
    env = no_data_env(tmp_path)
    proc = run_launch([a.replace("{tmp}", str(tmp_path)) for a in args], env=env, cwd=tmp_path, check=2)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "compiled" not in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_an_error_after_the_folder_was_made_removes_it(tmp_path):
    wd = tmp_path / "run"
    proc = run_launch(["--experiment=xray_light", "--k=1", "--dataset=synthetic", "--synthetic_size=8",
                       "--image_size=16", "--batch_size=64", f"--workdir={wd}"], check=2)
    assert "larger than the training split" in proc.stderr
    assert not wd.exists()


def _fake_results(acc, auc, seeds=1, synthetic=False):
    r = {"total_params": 1000, "trainable_params": 900, "size_bytes": 20480, "test_accuracy": None,
         "select_split": "val", "select_metrics": {"accuracy": acc, "roc_auc": auc, "sensitivity": 0.9,
                                                   "specificity": 0.5},
         "majority_baseline": {"val": 0.74}, "time_per_epoch_s": 1.5, "synthetic": synthetic}
    if seeds > 1:
        r["select_metrics"].update(accuracy_std=0.01, roc_auc_std=0.02)
    return r


def test_comparison_table_and_combined_figure(tmp_path):
    rows = tables.comparison_rows([_fake_results(0.9, 0.95, seeds=3), _fake_results(0.8, 0.85)], ["A", "B"])
    md = tables.comparison_markdown(rows, note="dataset: x")
    head = md.splitlines()[2]
    for column in ("size KB", "val AUC", "val sens", "val spec", "val majority", "test acc"):
        assert column in head
    assert "| A | 1,000 | 900 | 20.0 | null | null | 0.9000 ± 0.0100 | 0.9500 ± 0.0200 | 0.9000 | 0.5000 | 0.7400 |" in md
    assert rows[0]["figure_split"] == "val" and rows[0]["accuracy"] == 0.9 and rows[1]["accuracy_std"] is None
    path = tables.comparison_figure(str(tmp_path / "c.png"), rows, "dataset x, val split")
    with Image.open(path) as im:
        assert im.size[0] == 1600


def test_curves_say_what_they_show(tmp_path):
    history = [{"epoch": e, "train_loss": [1.0 / e], "train_accuracy": [0.5], "select_loss": [1.0],
                "select_accuracy": [0.6], "learning_rate": [1e-3], "epoch_s": 1.0} for e in (1, 2, 3)]
    results = {"model": "xray_light", "model_kwargs": {"k": 5}, "config": {"image_size": 28},
               "dataset": {"name": "synthetic"}, "synthetic": True, "best_epoch": 2}
    assert report.run_title(results) == "xray_light K=5, 28 px, synthetic (SYNTHETIC)"
    report.write_run(str(tmp_path), results, history)
    with Image.open(tmp_path / "curves.png") as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    reddish = (pixels[:, 0] > 200) & (pixels[:, 1] < 200) & (pixels[:, 2] < 200)
    assert reddish.sum() > 500  # the SYNTHETIC banner


def test_curves_mark_the_epoch_whose_weights_were_kept(tmp_path, monkeypatch):
    """The best epoch for a best-checkpoint run; the last one (kept_epoch) under --paper_protocol."""
    seen = []
    monkeypatch.setattr(report, "plot_curves", lambda *a, **k: seen.append((k["best_epoch"], k["epoch_label"])))
    history = [{"epoch": e, "train_loss": [1.0], "train_accuracy": [0.5], "select_loss": [1.0],
                "select_accuracy": [0.6], "learning_rate": [1e-3], "epoch_s": 1.0} for e in (1, 2, 3)]
    base = {"model": "mnist_conv2d", "config": {}, "dataset": {"name": "x"}, "best_epoch": 2}
    report.write_run(str(tmp_path), dict(base, kept_checkpoint="best", kept_epoch=2), history)
    report.write_run(str(tmp_path), dict(base, kept_checkpoint="last", kept_epoch=3), history)
    report.write_run(str(tmp_path), base, history)  # runs from before kept_checkpoint existed
    assert seen == [(2, "selected epoch"), (3, "kept epoch (last)"), (2, "selected epoch")]


def test_summaries_round_trip(tmp_path):
    with tensorboard.Writer(str(tmp_path)) as tb:
        tb.epoch(5, {"train/loss": 0.5, "val/roc_auc": None})
        tb.epoch(10, {"train/loss": 0.25})
    assert tensorboard.read_scalars(str(tmp_path)) == {"train/loss": [(5, 0.5), (10, 0.25)]}


def test_summaries_do_not_import_torch(tmp_path):
    """tensorboardX imports PyTorch when it is installed (seconds per run start); the writer keeps it
    out, and a later `import torch` still works."""
    code = (f"import sys, importlib.util\nfrom lightflax import tensorboard\n"
            f"with tensorboard.Writer({str(tmp_path)!r}) as w:\n    w.epoch(1, {{'a': 0.5}})\n"
            f"assert 'torch' not in sys.modules, 'torch imported'\n"
            f"assert tensorboard.read_scalars({str(tmp_path)!r}) == {{'a': [(1, 0.5)]}}\n"
            f"if importlib.util.find_spec('torch'):\n    import torch\n    print('torch', torch.__name__)\n")
    out = run_python(code).stdout
    import importlib.util

    assert ("torch torch" in out) == (importlib.util.find_spec("torch") is not None)


def test_tables_take_one_run_folder_and_reject_unknown_metrics(tmp_path, capsys):
    run = tmp_path / "xray_light-k5"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"total_params": 5, "test_accuracy": 0.5,
                                                  "select_metrics": {"accuracy": 0.7}}))
    assert tables.main([str(run), "--metrics=test_accuracy,select.accuracy"]) == 0
    assert "| xray_light-k5 | 1 | ? | ? | best | 5 | 0.5000 (n=1) | 0.7000 (n=1) |" in capsys.readouterr().out
    assert tables.main([str(run), "--metrics=test_acuracy"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric test_acuracy" in err and "test_accuracy" in err


def test_a_long_phase_is_never_silent_in_a_log(capsys):
    from lightflax import progress

    before = progress.mode()
    try:
        progress.set_mode("auto")  # stdout is captured here: not a terminal
        with progress.phase(4, "inception_v3 features of 100 images", unit="batch") as bar:
            for _ in range(4):
                bar.update()
        progress.set_mode("quiet")
        with progress.phase(4, "silent", unit="batch"):
            pass
    finally:
        progress.set_mode(before)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "inception_v3 features of 100 images: 4 batches ..."
    assert re.fullmatch(r"inception_v3 features of 100 images: done in \d+\.\d s", lines[1]) and len(lines) == 2


def test_profile_trace_lands_in_the_run_folder(tmp_path):
    wd = tmp_path / "run"
    run_launch(["--experiment=xray_light", "--k=1", "--dataset=synthetic", "--synthetic_size=16", "--image_size=16",
                "--batch_size=4", "--epochs=1", "--profile", "--profile_start_step=1", "--profile_steps=1",
                f"--workdir={wd}"], check=0)
    assert list((wd / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert list(wd.glob("events.out.tfevents.*"))
    assert json.loads((wd / "results.json").read_text())["config"]["profile_dir"] == str(wd)
