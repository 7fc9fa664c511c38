"""Smaller input cases: predict warns on tiny images as training does; --data_dir naming a file names it;
a missing val/ folder says what to do; a --k far beyond the study's warns with the parameter count."""

import json
import shutil

import numpy as np
import pytest

from conftest import run_launch

from test_data_folders import _tree
from test_plan import RUN_V1, _parsed

def test_predict_warns_on_images_smaller_than_the_run_and_32_pixels(tmp_path):
    # a finished 16x16 xray_light run (tests/data/run_v1, 1 epoch of synthetic data): predict reads it as it
    # reads a fresh one (test_plan), and training one here took a whole launch
    wd = tmp_path / "w"
    shutil.copytree(RUN_V1, wd)
    assert json.loads((wd / "results.json").read_text())["config"]["image_size"] == 16

    def predict(side):
        np.savez(tmp_path / "in.npz", images=np.full((3, side, side), 100, np.uint8))
        return run_launch(["--experiment=predict", f"--workdir={wd}", f"--input_npz={tmp_path / 'in.npz'}",
                           f"--output_npz={tmp_path / f'out{side}.npz'}"], check=0).stderr

    out = predict(2)
    assert "WARNING:" in out and "images are 2x2 pixels, smaller than 16x16" in out
    assert (tmp_path / "out2.npz").exists()  # kept and scored, as training keeps tiny images
    assert "WARNING" not in predict(16)


def test_data_dir_naming_a_file_without_dataset_names_the_file(tmp_path):
    f = tmp_path / "pneumoniamnist.npz"
    f.write_bytes(b"not a folder")
    proc = run_launch(["--experiment=xray_light", "--k=1", f"--data_dir={f}", f"--workdir={tmp_path / 'w'}"],
                      check=2)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(f) in err[0] and "is a file" in err[0] and "--dataset=pneumonia_mnist" in err[0]
    assert not (tmp_path / "w").exists()


def test_a_missing_val_folder_says_what_to_do(tmp_path):
    root = _tree(tmp_path / "chest_xray")
    for split_class in (root / "val").iterdir():
        for f in split_class.iterdir():
            f.unlink()
        split_class.rmdir()
    (root / "val").rmdir()
    wd = tmp_path / "w"
    proc = run_launch(["--experiment=xray_light", "--k=1", f"--manual_dir={root}", "--image_size=64",
                       f"--data_dir={tmp_path / 'prep'}", "--epochs=1", f"--workdir={wd}"], check=2)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no val split" in err[0] and "val/ folder" in err[0] and "--select_split=test" in err[0]
    assert not wd.exists()


@pytest.mark.parametrize("k, warned", [(5, False), (100, False), (1000, True)])
def test_a_rank_far_beyond_the_study_warns_with_the_count(tmp_path, capsys, k, warned):
    from experiments import plan

    config, explicit = _parsed("xray_light", ["--dataset=synthetic", f"--k={k}", "--image_size=64"], tmp_path)
    p = plan.resolve(config, explicit)  # a warning, never a refusal
    lines = [n for n in p.data_notes if n.startswith("WARNING: --k=")]
    assert bool(lines) == warned
    if warned:
        from lightflax import models, param_counts

        ch = p.rows[0].run.channels
        n = param_counts.param_counts(models.create("xray_light", k=k), (1, 64, 64, ch))["total"]
        assert f"gives xray_light {n:,} parameters" in lines[0] and n > 1_800_000
        assert lines[0] in capsys.readouterr().err


def test_memory_is_checked_from_shapes_before_anything_is_allocated(tmp_path):
    wd = tmp_path / "w"
    proc = run_launch(["--experiment=xray_light", "--k=2", "--dataset=synthetic", "--image_size=2048",
                       "--synthetic_size=100000", "--epochs=1", f"--workdir={wd}"], check=2)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "nothing was allocated" in err[0] and "synthetic splits" in err[0] and "--synthetic_size" in err[0]
    assert not wd.exists()


@pytest.mark.parametrize("seeds", [1, 4])
def test_the_memory_advice_fits_the_flags_given(tmp_path, monkeypatch, seeds):
    from experiments import plan
    from lightflax import memory, models
    from lightflax.errors import UserError

    config, explicit = _parsed("xray_light", ["--dataset=synthetic", "--k=2", "--image_size=64",
                                              "--synthetic_size=16", f"--num_seeds={seeds}"], tmp_path)
    p = plan.resolve(config, explicit)  # fits in the real machine
    assert p.rows
    need = memory.lower_bound_bytes(models.create("xray_light", k=2),
                                    (64, 64, p.rows[0].run.channels), config.optimizer.batch_size, seeds)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: int(need * 0.6))
    with pytest.raises(UserError) as e:
        plan.resolve(config, explicit)
    msg = str(e.value)
    assert "nothing was allocated" in msg and "\n" not in msg
    if seeds == 1:
        assert "--num_seeds" not in msg and "smaller --batch_size" in msg
    else:
        assert "--num_seeds=2 or fewer" in msg
