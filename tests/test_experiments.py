"""Every experiment end to end through launch.py on tiny synthetic data; flags and errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, idx_folder, run_launch, separable_npz
from lightflax import metrics, parallel, tables

TINY = ["--dataset=synthetic", "--synthetic_size=32", "--batch_size=8", "--epochs=1", "--steps_per_epoch=2"]


def _results(workdir):
    return json.loads((workdir / "results.json").read_text())


STUDY_KEYS = ("total_params", "trainable_params", "size_bytes", "test_accuracy", "total_time_s", "time_per_epoch_s",
              "test_loss", "compile_time_s", "images_per_s", "flops_per_step")


def _check_reports(proc, wd, params):
    """What every experiment's run reports (stdout, results.json, the run folder) after TINY training."""
    assert "epoch 1/1" in proc.stdout and "steps/s" in proc.stdout
    # stdout is not a terminal: one line per epoch, no progress bars
    assert "step/s" not in proc.stdout and "\r" not in proc.stdout
    assert [ln[:9] for ln in proc.stdout.splitlines() if ln.startswith("epoch ")] == ["epoch 1/1"]
    r = _results(wd)
    for key in STUDY_KEYS:
        assert key in r, key
    assert r["synthetic"] is True and r["dataset"]["synthetic"] is True and r["dataset"]["name"] == "synthetic"
    assert r["dataset"]["splits"]["train"] == 32
    if params is not None:
        assert r["total_params"] == params
    assert r["size_bytes"] == os.path.getsize(wd / "model.msgpack")
    assert r["flops_per_step"] > 0 and r["images_per_s"] > 0 and r["compile_time_s"] > 0
    assert (wd / "history.csv").read_text().count("\n") == 2
    assert (wd / "curves.png").stat().st_size > 1000
    if r["dataset"]["num_classes"] == 2:
        for key in ("sensitivity", "specificity", "roc_auc"):
            assert key in r


# xray_light (--k=2 --image_size=16, 4,600 parameters): its run is test_two_processes_through_jax_distributed's
# single-process reference, checked there with _check_reports
@pytest.mark.parametrize(
    "args,params",
    [
        (["--experiment=xray_conv2d", "--image_size=50"], 31_074),
        (["--experiment=mnist", "--method=conv2d", "--image_size=28"], 18_818),
        (["--experiment=fashion_mnist", "--method=light", "--k=6", "--image_size=28"], 11_364),
        (["--experiment=cifar10", "--method=separable", "--image_size=32"], None),
        (["--experiment=cifar100", "--method=light", "--k=1", "--image_size=32"], 6_747),
    ],
)
def test_experiment_runs_and_reports(tmp_path, args, params):
    wd = tmp_path / "run"
    proc = run_launch(args + TINY + [f"--workdir={wd}"], check=0)
    _check_reports(proc, wd, params)


def test_synthetic_data_only_when_asked_for(tmp_path):
    """Without data the X-ray jobs train on the embedded real X-rays (tests/test_user_view.py); a paper
    experiment whose dataset is missing (offline) stops with one line instead of training on noise."""
    env = {"LIGHTFLAX_DATA_DIR": str(tmp_path / "nothing-here"), "HOME": str(tmp_path),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = run_launch(["--experiment=mnist", "--data_dir=" + str(tmp_path / "nothing-here"), "--epochs=1",
                       f"--workdir={tmp_path / 'm'}"], env=env, check=2)
    assert "SYNTHETIC" not in proc.stdout + proc.stderr and not (tmp_path / "m").exists()


def test_xray_compare_writes_the_study_table(tmp_path):
    wd = tmp_path / "cmp"
    proc = run_launch(["--experiment=xray_compare", "--ks=1", "--transfer_backbone=none", "--image_size=50", *TINY,
                       "--verbosity=-2", f"--workdir={wd}"], check=0)
    assert not [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]  # --verbosity=-2: quiet
    md = (wd / "comparison.md").read_text()
    assert "LightLayers K=1" in md and "Conv2D" in md and "SYNTHETIC" in md
    assert "2,753" in md and "31,074" in md
    assert (wd / "comparison_total_params.png").exists() and (wd / "comparison.png").stat().st_size > 10_000
    assert (wd / "explanations.png").stat().st_size > 10_000 and "explanations.png: " in proc.stdout
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert "accuracy/AUC figures on the test split (16 images)" in md and " test AUC " in header
    assert "rows trained 2 at a time (--concurrent_rows=2" in md  # the default: its times are marked contended
    comparison = json.loads((wd / "comparison.json").read_text())
    assert comparison["rows"][0]["total_params"] == 2_753
    # each row's wall time and the study's total, in comparison.json and comparison.md
    walls = [r["row_wall_s"] for r in comparison["rows"]]
    assert all(w > 0 for w in walls) and comparison["rows_wall_s"] == pytest.approx(sum(walls))
    assert comparison["study_wall_s"] >= max(walls)  # rows overlap (two at a time): their sum may exceed it
    assert f"study wall time {comparison['study_wall_s']:.1f} s" in md and " wall s " in header
    # the rows' prediction spreads come from their predictions.npz; a row is flagged iff they are constant
    for row in comparison["rows"]:
        assert (row["dead"] is not None) == (max(row["prediction_spread"]) < tables.DEAD_SPREAD), row
        assert (f"{row['model']} (dead: constant predictions)" in md) == (row["dead"] is not None)


def test_a_live_model_learns_and_predict_scores_new_images(tmp_path):
    """xray_light K=2 (alive at initialisation, unlike K=1 with seed 0) learns a separable task end to
    end, and predict scores new images of that task as well as the run's own test split."""
    separable_npz(tmp_path / "task.npz")
    wd = tmp_path / "run"
    run_launch(["--experiment=xray_light", "--k=2", "--dataset=pneumonia_mnist", f"--data_dir={tmp_path / 'task.npz'}",
                "--batch_size=16", "--epochs=4", f"--workdir={wd}"], check=0)
    r = _results(wd)
    assert r["synthetic"] is False and r["dataset"]["splits"] == {"train": 96, "val": 48, "test": 48}
    assert r["select_metrics"]["roc_auc"] > 0.8 and r["roc_auc"] > 0.8, (r["select_metrics"], r["test_metrics"])
    images, labels = separable_npz(tmp_path / "new.npz", sizes=(("new", 40),), seed=5)["new"]
    np.savez(tmp_path / "in.npz", images=images)
    out = tmp_path / "out.npz"
    run_launch(["--experiment=predict", f"--workdir={wd}", f"--input_npz={tmp_path / 'in.npz'}",
                f"--output_npz={out}"], check=0)
    p = np.load(out)["probabilities"]
    assert p.shape == (40, 2)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    assert metrics.roc_auc(p[:, 1], labels) > 0.8
    # RGB input of another size works too, and scores exactly as its grayscale version (ITU-R 601-2 luma
    # rounded to uint8, Pillow's "L"): the run trained on 1-channel images. The RGB images are the task's
    # own (upscaled and cropped to 40 px, channels made to differ), so the model's outputs depend on their content.
    from lightflax import predict

    task = np.repeat(np.repeat(images[:6], 2, axis=1), 2, axis=2)[:, :40, :40]
    rgb = np.stack([task, task // 2 + 60, 255 - task], axis=-1).astype(np.uint8)
    gray = np.clip(np.round(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)), 0, 255)
    np.savez(tmp_path / "rgb.npz", images=rgb)
    np.savez(tmp_path / "gray.npz", images=gray.astype(np.uint8))
    p_rgb, _ = predict.predict_npz(str(wd), str(tmp_path / "rgb.npz"), str(tmp_path / "rgb_out.npz"))
    p_gray, _ = predict.predict_npz(str(wd), str(tmp_path / "gray.npz"), str(tmp_path / "gray_out.npz"))
    assert p_rgb.shape == (6, 2)
    np.testing.assert_array_equal(p_rgb, p_gray)
    # test-time adaptation from the command line: the summary line names what ran; too few images for
    # AdaBN fall back in one line
    proc = run_launch(["--experiment=predict", f"--workdir={wd}", f"--input_npz={tmp_path / 'in.npz'}",
                       f"--output_npz={out}", "--adapt_bn", "--label_shift=em", "--calibrate=temperature"], check=0)
    assert "adaptations: AdaBN (" in proc.stdout and "; temperature " in proc.stdout and "; EM label shift" in proc.stdout
    assert metrics.roc_auc(np.load(out)["probabilities"][:, 1], labels) > 0.8
    proc = run_launch(["--experiment=predict", f"--workdir={wd}", f"--input_npz={tmp_path / 'gray.npz'}",
                       f"--output_npz={out}", "--adapt_bn"], check=0)
    assert "--adapt_bn: 6 images, fewer than 32" in proc.stdout and "adaptations: none" in proc.stdout
    proc = run_launch(["--experiment=predict", f"--workdir={wd}", f"--input_npz={tmp_path / 'in.npz'}",
                       f"--output_npz={out}", "--label_shift=bbse"], check=2)
    assert "Traceback" not in proc.stderr and "label_shift" in proc.stderr
    # bad input: one line, exit 2
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 8, 8), np.uint8))
    proc = run_launch(["--experiment=predict", f"--workdir={wd}", f"--input_npz={tmp_path / 'bad.npz'}",
                       f"--output_npz={out}"], check=2)
    assert "has no 'images' array" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_launch(["--experiment=predict", f"--workdir={tmp_path / 'nope'}", f"--input_npz={tmp_path / 'in.npz'}",
                       f"--output_npz={out}"], check=2)
    assert "results.json not found" in proc.stderr


def test_multi_seed_run_reports_every_replica_and_predicts_each(tmp_path):
    """--num_seeds=2 end to end in both replica modes: results.json holds each replica's
    own numbers, the mean and sample std over them; both modes train the same replicas;
    predict scores any replica with --seed_index, their mean by default, and refuses a replica that does not
    exist."""
    runs = {}
    for mode in ("vmap", "loop"):
        wd = tmp_path / mode
        run_launch(["--experiment=xray_light", "--k=2", "--image_size=16", *TINY, "--num_seeds=2",
                    f"--replica_mode={mode}", "--seed=3", f"--workdir={wd}"], check=0)
        runs[mode] = r = _results(wd)
        assert r["num_seeds"] == 2 and r["config"]["replica_mode"] == mode
        reps = r["replicas"]
        assert [p["seed"] for p in reps] == [3, 4]
        acc = [p["test"]["accuracy"] for p in reps]
        loss = [p["test"]["loss"] for p in reps]
        assert loss[0] != loss[1]  # independently initialised replicas
        np.testing.assert_allclose(r["test_accuracy"], np.mean(acc), rtol=1e-12)
        np.testing.assert_allclose(r["test_loss"], np.mean(loss), rtol=1e-12)
        np.testing.assert_allclose(r["test_loss_std"], np.std(loss, ddof=1), rtol=1e-9)
        np.testing.assert_allclose(r["test_accuracy_std"], np.std(acc, ddof=1), rtol=1e-9, atol=1e-15)
    for a, b in zip(runs["vmap"]["replicas"], runs["loop"]["replicas"]):
        np.testing.assert_allclose(a["test"]["loss"], b["test"]["loss"], rtol=1e-3)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "in.npz", images=rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8))
    probs = []
    for index in (0, 1):
        out = tmp_path / f"out{index}.npz"
        run_launch(["--experiment=predict", f"--workdir={tmp_path / 'loop'}", f"--input_npz={tmp_path / 'in.npz'}",
                    f"--output_npz={out}", f"--seed_index={index}"], check=0)
        probs.append(np.load(out)["probabilities"])
        assert probs[-1].shape == (5, 2)
    assert not np.allclose(probs[0], probs[1])
    proc = run_launch(["--experiment=predict", f"--workdir={tmp_path / 'loop'}", f"--input_npz={tmp_path / 'in.npz'}",
                       f"--output_npz={tmp_path / 'ens.npz'}"], check=0)  # default: the replicas' mean
    np.testing.assert_allclose(np.load(tmp_path / "ens.npz")["probabilities"], np.mean(probs, axis=0), rtol=1e-6)
    assert "5 images, ensemble of 2 replicas" in proc.stdout
    proc = run_launch(["--experiment=predict", f"--workdir={tmp_path / 'loop'}", f"--input_npz={tmp_path / 'in.npz'}",
                       f"--output_npz={tmp_path / 'x.npz'}", "--seed_index=2"], check=2)
    assert "--seed_index 2 is out of range" in proc.stderr and "Traceback" not in proc.stderr


def test_paper_protocol_trains_on_everything_in_order_and_selects_on_test(tmp_path):
    """--paper_protocol: no hold-out (train = every official training image), no
    shuffling, the callbacks on the test split, the LAST epoch's weights reported; said in results.json."""
    folder = tmp_path / "idx"
    idx_folder(folder, n_train=40, n_test=16, seed=0)
    wd = tmp_path / "paper"
    run_launch(["--experiment=fashion_mnist", "--method=light", "--k=2", f"--data_dir={folder}", "--batch_size=8",
                "--epochs=2", "--paper_protocol", f"--workdir={wd}"], check=0)
    r = _results(wd)
    assert r["dataset"]["splits"] == {"train": 40, "val": None, "test": 16}
    assert r["config"]["shuffle"] is False and r["select_split"] == "test"
    assert r["steps_per_epoch"] == 5 and r["epochs_run"] == 2
    assert any("paper protocol" in n for n in r["notes"])
    assert r["select_metrics"]["accuracy"] == r["test_accuracy"]
    assert r["kept_checkpoint"] == "last" and r["kept_epoch"] == 2
    proc = run_launch(["--experiment=fashion_mnist", f"--data_dir={folder}", "--paper_protocol", "--select_split=val",
                       f"--workdir={tmp_path / 'x'}"], check=2)
    assert "--paper_protocol selects on the test split" in proc.stderr and "Traceback" not in proc.stderr


def test_no_shuffle_keeps_the_stored_order():
    from lightflax import data, train
    from lightflax.config import RunConfig

    d = data.load("synthetic", synthetic_shape=(8, 8, 1), synthetic_sizes={"train": 24, "val": 8, "test": 8},
                  num_classes=2)
    for shuffle in (True, False):
        cfg = RunConfig.flat(workdir="unused", model="xray_light", model_kwargs={"k": 1}, batch_size=8,
                        image_size=8, channels=3, shuffle=shuffle, num_seeds=2)
        tr = train.Trainer(cfg, d)
        perms = [np.asarray(tr.permutations(e)) for e in (0, 1)]
        assert perms[0].shape == (2, 24)
        if shuffle:
            assert not np.array_equal(perms[0][0], perms[1][0]) and not np.array_equal(perms[0][0], perms[0][1])
        else:
            for p in perms:
                np.testing.assert_array_equal(p, np.tile(np.arange(24), (2, 1)))


def test_profile_dir_writes_a_trace(tmp_path):
    wd, prof = tmp_path / "run", tmp_path / "prof"
    run_launch(["--experiment=xray_light", "--k=1", "--image_size=16", "--dataset=synthetic", "--synthetic_size=48",
                "--batch_size=8", "--epochs=1", f"--workdir={wd}", f"--profile_dir={prof}",
                "--profile_start_step=1", "--profile_steps=2"], check=0)
    traces = [p for p in prof.rglob("*") if p.name.endswith((".xplane.pb", ".trace.json.gz"))]
    assert traces and all(p.stat().st_size > 0 for p in traces)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--experiment=nope"], "unknown experiment 'nope'; available: "),
        (["--experiment=xray_light", "--k=0"], "--k"),
        (["--experiment=xray_light", "--dataset=imagenet"], "--dataset"),
        (["--experiment=xray_light", "--epochs=0"], "--epochs"),
        (["--experiment=xray_conv2d", "--dataset=synthetic", "--image_size=16"], "too small for xray_conv2d"),
        (["--experiment=mnist", "--method=conv2d", "--k=3", "--dataset=synthetic"], "--k applies to --method=light"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(args, message, tmp_path):
    proc = run_launch(args + [f"--workdir={tmp_path / 'w'}"], check=2)
    err = proc.stderr.strip().splitlines()
    assert err and message in err[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_batch_not_divisible_by_devices(tmp_path):
    proc = run_launch(["--experiment=xray_light", "--k=1", *TINY, "--batch_size=9", "--image_size=16",
                       f"--workdir={tmp_path / 'w'}"], devices=2, check=2)
    assert "not divisible by the 2 devices" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_explicit_dataset_is_a_clear_error(tmp_path):
    proc = run_launch(["--experiment=xray_light", "--dataset=chest_xray", f"--manual_dir={tmp_path / 'none'}",
                       f"--workdir={tmp_path / 'w'}"], env={"LIGHTFLAX_DATA_DIR": str(tmp_path / "d")}, check=2)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_helpfull_lists_common_and_experiment_flags():
    proc = run_launch(["--experiment=xray_light", "--helpfull"])
    out = proc.stdout + proc.stderr
    for flag in ("--workdir", "--dataset", "--data_dir", "--manual_dir", "--image_size", "--batch_size", "--epochs",
                 "--learning_rate", "--seed", "--[no]resume", "--profile_dir", "--k:", "--num_seeds"):
        assert flag in out, flag
    # --config's default by its repository path, not this checkout's absolute one
    assert "(default: 'configs/xray_light.py')" in out and str(REPO / "configs") not in out


def test_two_processes_through_jax_distributed(tmp_path):
    """Two CPU processes on localhost train one model (1 device each) like one process with 2 devices."""
    port = parallel.free_local_port()
    # K=2: alive at initialisation (K=1 with seed 0 is dead: its constant activations would hide wrong
    # cross-process BatchNorm statistics and gradients)
    args = ["--experiment=xray_light", "--k=2", "--image_size=16", *TINY]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args, f"--workdir={tmp_path / 'multi'}",
                          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "2 device(s)" in out
    single = tmp_path / "single"
    proc = run_launch(args + [f"--workdir={single}"], devices=2, check=0)
    _check_reports(proc, single, 4_600)  # xray_light's case of test_experiment_runs_and_reports
    a, b = _results(tmp_path / "multi"), _results(single)
    assert a["devices"]["process_count"] == 2 and a["devices"]["num_devices"] == 2
    # cross-process all-reduce sums in another order than in-process: float noise only
    np.testing.assert_allclose(a["select_metrics"]["loss"], b["select_metrics"]["loss"], rtol=2e-3)
