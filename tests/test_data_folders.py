"""Kaggle-layout folders as users have them: the whole layout is checked before any image is
decoded; a split without a class (train, val or test) is one line and exit 2 with no run folder left; images in
subfolders of a class folder are used and said; a class folder inside another one is refused."""

from pathlib import Path

import numpy as np
import pytest

from conftest import run_launch

from lightflax import data
from lightflax.data import chest_xray
from lightflax.errors import DataError


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40), value, np.uint8)).save(path)


def _tree(root: Path, skip=(), per_class=2) -> Path:
    for split in ("train", "val", "test"):
        for label, cls in enumerate(chest_xray.CLASSES):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            if (split, cls) in skip:
                continue
            for i in range(per_class):
                _png(root / split / cls / f"{i}.png", 60 + 100 * label + i)
    return root


@pytest.mark.parametrize("split,how", [("train", "empty"), ("train", "missing"), ("val", "empty"),
                                       ("test", "empty"), ("test", "missing")])
def test_a_one_class_split_is_refused_before_decoding(tmp_path, monkeypatch, split, how):
    cls = "NORMAL" if split != "val" else "PNEUMONIA"
    root = _tree(tmp_path / "chest_xray", skip={(split, cls)})
    if how == "missing":
        (root / split / cls).rmdir()
    monkeypatch.setattr(chest_xray, "_try_decode", lambda *a: pytest.fail("decoded before the check"))
    with pytest.raises(DataError) as e:
        data.load("chest_xray", manual_dir=str(root), data_dir=str(tmp_path / "prep"), stored_size=64)
    assert "\n" not in str(e.value) and str(root / split) in str(e.value) and cls in str(e.value)
    assert f"the {split} split needs images of both classes" in str(e.value) or how == "missing"
    assert not (tmp_path / "prep").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_one_class_split_is_exit_2_with_no_run_folder(tmp_path, split):
    root = _tree(tmp_path / "chest_xray", skip={(split, "NORMAL")})
    wd = tmp_path / "w"
    proc = run_launch(["--experiment=xray_light", "--k=1", f"--manual_dir={root}", "--image_size=64",
                       f"--data_dir={tmp_path / 'prep'}", "--epochs=1", f"--workdir={wd}"], check=2)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "NORMAL holds no images" in err[0] and f"{split} split needs images of both classes" in err[0]
    assert not wd.exists() and "epoch" not in proc.stdout and not (tmp_path / "prep").exists()


def test_images_in_subfolders_are_used_and_said(tmp_path, capsys):
    root = _tree(tmp_path / "chest_xray")
    _png(root / "train" / "PNEUMONIA" / "batch2" / "deeper" / "x.png", 250)
    _png(root / "train" / "PNEUMONIA" / "batch2" / "y.png", 251)
    _png(root / "train" / "NORMAL" / "NORMAL" / "z.png", 20)  # a doubled class folder: same label, used
    d = data.load("chest_xray", manual_dir=str(root), data_dir=str(tmp_path / "prep"), stored_size=64)
    assert np.bincount(d.splits["train"].labels).tolist() == [3, 4]  # the nested images, with their labels
    line = next(n for n in d.notes if n.startswith("data: "))
    assert "3 image(s) in subfolders of class folders" in line and "NORMAL/NORMAL/z.png" in line
    assert line in capsys.readouterr().out


def test_a_class_folder_inside_another_is_refused(tmp_path):
    root = _tree(tmp_path / "chest_xray")
    _png(root / "train" / "PNEUMONIA" / "NORMAL" / "x.png", 10)
    with pytest.raises(DataError, match="is a class folder inside") as e:
        data.load("chest_xray", manual_dir=str(root), data_dir=str(tmp_path / "prep"), stored_size=64)
    assert str(root / "train" / "NORMAL") in str(e.value)


def test_flat_folders_list_as_before(tmp_path):
    root = _tree(tmp_path / "chest_xray")
    listing, notes = chest_xray.scan(root)
    assert [rel for rel, _ in listing["train"]] == ["train/NORMAL/0.png", "train/NORMAL/1.png",
                                                   "train/PNEUMONIA/0.png", "train/PNEUMONIA/1.png"]
    assert not any(n.startswith("data: ") for n in notes)


def test_a_train_split_without_a_class_is_refused_for_any_dataset():
    from experiments import training
    from lightflax.data.types import DatasetSplits, Split

    def splits(labels):
        s = Split(np.zeros((len(labels), 4, 4, 1), np.uint8), np.asarray(labels, np.int32))
        return DatasetSplits("pneumonia_mnist", False, 2, ["normal", "pneumonia"],
                             {"train": s, "val": s, "test": None}, source="p.npz")

    training.check_train_classes(splits([0, 1, 1]))
    with pytest.raises(DataError, match="holds no image of class normal"):
        training.check_train_classes(splits([1, 1, 1]))


_LOAD_AT = """
import sys, time
from lightflax import data
root, prep, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # both runs begin preparing at the same moment
d = data.load("chest_xray", manual_dir=root, data_dir=prep, stored_size=64)
print(len(d.splits["train"].labels))
"""


def test_two_runs_preparing_one_new_folder_at_once_both_succeed(tmp_path):
    import os
    import subprocess
    import sys
    import time

    root = _tree(tmp_path / "chest_xray")
    prep = tmp_path / "prep"
    start = str(time.time() + 12)  # after both have imported TFDS
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD_AT, str(root), str(prep), start], env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip().splitlines()[-1] == "4", err[-3000:]
        assert "Traceback" not in err
    copies = [p for p in prep.rglob("dataset_info.json")]
    assert len(copies) == 1, copies  # one prepared copy, kept
    assert not [p for p in prep.rglob("*") if ".building-" in p.name or p.name.startswith("incomplete")]
    d = data.load("chest_xray", manual_dir=str(root), data_dir=str(prep), stored_size=64)  # a third run reuses it
    assert len(d.splits["train"].labels) == 4


@pytest.mark.parametrize("variable", ["XDG_CACHE_HOME", "HOME"])
def test_a_cache_location_that_is_a_file_is_one_line_naming_the_variable(tmp_path, variable):
    root = _tree(tmp_path / "chest_xray")
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    env = {"LIGHTFLAX_DATA_DIR": "", "XDG_CACHE_HOME": "", variable: str(a_file)}  # empty: unset for lightflax
    proc = run_launch(["--experiment=xray_light", "--k=1", f"--manual_dir={root}", "--image_size=64", "--epochs=1",
                       f"--workdir={tmp_path / 'w'}"], check=2, env=env)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{a_file} is a file" in err[0] and "LIGHTFLAX_DATA_DIR" in err[0] and "XDG_CACHE_HOME" in err[0]
