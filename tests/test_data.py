"""Data layer: TFDS builders prepared from generated fixtures, load(), errors."""

from pathlib import Path

import numpy as np
import pytest

from lightflax import data
from lightflax.errors import DataError

from conftest import idx_folder, shared_dir

SHARED_NPZ = shared_dir() / "data" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Prepared files go to a temporary cache; no download is ever attempted."""
    monkeypatch.setenv("LIGHTFLAX_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("lightflax.data.locations.download", _no_download)


def _no_download(url, *a, **k):
    raise DataError(f"offline test: not downloading {url}")


# ----------------------------------------------------------------------------
# chest_xray
# ----------------------------------------------------------------------------

# (split, class) -> number of good JPEGs; val/NORMAL is an empty folder.
COUNTS = {("train", "NORMAL"): 3, ("train", "PNEUMONIA"): 4, ("val", "NORMAL"): 1, ("val", "PNEUMONIA"): 2,
          ("test", "NORMAL"): 2, ("test", "PNEUMONIA"): 3}


def _jpeg(path: Path, seed: int, size=(40, 32), mode="L"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, quality=90)


def make_kaggle_tree(base: Path, counts=COUNTS, nested=True) -> Path:
    """base/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg in the Kaggle layout, with
    .DS_Store files, one corrupt JPEG (train/PNEUMONIA), a small val split (3 images),
    an RGB JPEG, __MACOSX litter and the nested duplicate chest_xray/chest_xray."""
    root = base / "chest_xray"
    seed = 0
    for (split, cls), n in counts.items():
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            seed += 1
            _jpeg(d / f"{cls.lower()}_{i:03d}.jpeg", seed, mode="RGB" if seed == 2 else "L")
        (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "PNEUMONIA" / "person_bad.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (base / "__MACOSX" / "chest_xray").mkdir(parents=True)
    if nested:
        for split in ("train", "val", "test"):
            for cls in ("NORMAL", "PNEUMONIA"):
                d = root / "chest_xray" / split / cls
                d.mkdir(parents=True)
                _jpeg(d / "dup.jpeg", 999)
    return root


def test_chest_xray_builder_from_kaggle_tree(tmp_path):
    from lightflax.data import chest_xray

    root = make_kaggle_tree(tmp_path / "kaggle")
    d = data.load("chest_xray", manual_dir=str(tmp_path / "kaggle"), stored_size=64)
    assert d.name == "chest_xray" and not d.synthetic and d.num_classes == 2
    assert d.class_names == ["NORMAL", "PNEUMONIA"]
    for split in ("train", "val", "test"):
        s = d.splits[split]
        want = [COUNTS[(split, "NORMAL")], COUNTS[(split, "PNEUMONIA")]]
        assert np.bincount(s.labels, minlength=2).tolist() == want, split
        assert s.images.shape == (sum(want), 64, 64, 1) and s.images.dtype == np.uint8
        assert s.labels.dtype == np.int32
        # Stored order = sorted file listing; pixels = Pillow decode -> L -> bilinear resize.
        files = sorted((root / split / "NORMAL").glob("*.jpeg")) + sorted(
            f for f in (root / split / "PNEUMONIA").glob("*.jpeg") if f.name != "person_bad.jpeg")
        ref = np.stack([chest_xray.decode(f, 64) for f in files])[..., None]
        np.testing.assert_array_equal(s.images, ref)
    notes = " | ".join(d.notes)
    assert "1 corrupt or unreadable image" in notes and "person_bad.jpeg" in notes
    assert "nested duplicate" in notes
    assert "val split has only 3 images" in notes


def test_chest_xray_manual_dir_is_the_folder_itself_and_reuses_prepared(tmp_path, monkeypatch):
    from lightflax.data import chest_xray

    root = make_kaggle_tree(tmp_path / "k", nested=False)
    first = data.load("chest_xray", manual_dir=str(root), stored_size=64, data_dir=str(tmp_path / "prep"))
    assert (tmp_path / "prep" / "tfds").is_dir()

    def boom(*a, **k):
        raise AssertionError("prepared twice")

    monkeypatch.setattr(chest_xray.ChestXray, "_generate_examples", boom)
    second = data.load("chest_xray", manual_dir=str(root), stored_size=64, data_dir=str(tmp_path / "prep"))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(first.splits[split].images, second.splits[split].images)
    assert any("corrupt" in n for n in second.notes)  # the report survives in the prepared metadata


def test_chest_xray_nested_duplicate_used_when_outer_has_no_splits(tmp_path):
    counts = {(s, c): 1 for s in ("train", "val", "test") for c in ("NORMAL", "PNEUMONIA")}
    make_kaggle_tree(tmp_path / "outer" / "chest_xray", counts=counts, nested=False)
    d = data.load("chest_xray", manual_dir=str(tmp_path / "outer"), stored_size=64)
    assert d.source.startswith(str(tmp_path / "outer" / "chest_xray" / "chest_xray"))
    assert len(d.splits["train"]) == 2  # the good JPEGs; the corrupt one reported
    assert [len(d.splits[s]) for s in ("val", "test")] == [2, 2]


def test_chest_xray_on_corrupt_fail(tmp_path):
    make_kaggle_tree(tmp_path / "k", nested=False)
    with pytest.raises(DataError, match=r"1 corrupt or unreadable.*person_bad\.jpeg.*--on_corrupt=skip"):
        data.load("chest_xray", manual_dir=str(tmp_path / "k"), stored_size=64, on_corrupt="fail")


def test_chest_xray_bad_layouts(tmp_path):
    root = make_kaggle_tree(tmp_path / "k", nested=False)
    (root / "test" / "COVID").mkdir()
    with pytest.raises(DataError, match="exactly the class folders NORMAL and PNEUMONIA, found COVID"):
        data.load("chest_xray", manual_dir=str(root), stored_size=64)
    with pytest.raises(DataError, match="stored at 299, 224, 128"):
        data.load("chest_xray", manual_dir=str(root), stored_size=100)
    with pytest.raises(DataError, match="on_corrupt"):
        data.load("chest_xray", manual_dir=str(root), stored_size=64, on_corrupt="ignore")


def test_chest_xray_missing_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as e:
        data.load("chest_xray", manual_dir=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg
    assert "kaggle" in msg.lower() and "--dataset=pneumonia_mnist" in msg and "--dataset=synthetic" in msg
    assert not data.available("chest_xray", manual_dir=str(tmp_path / "nowhere"))
    make_kaggle_tree(tmp_path / "k", nested=False)
    assert data.available("chest_xray", manual_dir=str(tmp_path / "k"))


def test_chest_xray_readable_through_tfds_data_source(tmp_path):
    import tensorflow_datasets as tfds

    make_kaggle_tree(tmp_path / "k", nested=False)
    d = data.load("chest_xray", manual_dir=str(tmp_path / "k"), stored_size=64, data_dir=str(tmp_path / "prep"))
    (prepared,) = list((tmp_path / "prep" / "tfds").iterdir())
    src = tfds.data_source("lightflax_chest_xray/64", split="test", data_dir=str(prepared), download=False)
    assert len(src) == len(d.splits["test"])
    rec = src[0]
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == (64, 64, 1)
    i = int(rec["index"])
    np.testing.assert_array_equal(rec["image"], d.splits["test"].images[i])


def test_import_without_tensorflow():
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here; the no-TF path cannot be checked")
    code = ("import sys, lightflax.data, lightflax.data.chest_xray, lightflax.data.pneumonia_mnist, "
            "lightflax.data.mnist, lightflax.data.pipeline, lightflax.data.augment; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ----------------------------------------------------------------------------
# pneumonia_mnist
# ----------------------------------------------------------------------------


def _npz(path: Path, sizes, size=28, label_shape_2d=True):
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in sizes.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 3 == 0).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None] if label_shape_2d else labels
    np.savez_compressed(path, **arrays)
    return arrays


def test_pneumonia_mnist_from_npz_file_and_folder(tmp_path):
    arrays = _npz(tmp_path / "pneumoniamnist.npz", {"train": 12, "val": 5, "test": 7})
    for data_dir in (tmp_path / "pneumoniamnist.npz", tmp_path):
        d = data.load("pneumonia_mnist", data_dir=str(data_dir))
        assert d.class_names == ["normal", "pneumonia"] and d.num_classes == 2 and not d.synthetic
        for split in ("train", "val", "test"):
            s = d.splits[split]
            assert s.images.shape == (len(arrays[f"{split}_labels"]), 28, 28, 1) and s.images.dtype == np.uint8
            np.testing.assert_array_equal(s.images[..., 0], arrays[f"{split}_images"])
            np.testing.assert_array_equal(s.labels, arrays[f"{split}_labels"][:, 0].astype(np.int32))
        assert not any("no test split" in n for n in d.notes)


def test_pneumonia_mnist_sizes_and_missing_test(tmp_path):
    _npz(tmp_path / "pneumoniamnist_64.npz", {"train": 6, "val": 3}, size=64, label_shape_2d=False)
    d = data.load("pneumonia_mnist", data_dir=str(tmp_path), stored_size=64)
    assert d.splits["train"].images.shape == (6, 64, 64, 1)
    assert d.splits["test"] is None
    assert any("no test split" in n and "never computed on val" in n for n in d.notes)
    # size inferred from an explicitly named file
    assert data.load("pneumonia_mnist", data_dir=str(tmp_path / "pneumoniamnist_64.npz")).splits[
        "val"].images.shape == (3, 64, 64, 1)
    with pytest.raises(DataError, match="64x64 images, not 128x128"):
        (tmp_path / "pneumoniamnist_128.npz").write_bytes((tmp_path / "pneumoniamnist_64.npz").read_bytes())
        data.load("pneumonia_mnist", data_dir=str(tmp_path / "pneumoniamnist_128.npz"), stored_size=128)
    with pytest.raises(DataError, match="not found"):
        data.load("pneumonia_mnist", data_dir=str(tmp_path / "empty"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable npz"):
        data.load("pneumonia_mnist", data_dir=str(tmp_path / "junk.npz"))


def test_pneumonia_mnist_missing_default(tmp_path, monkeypatch):
    """No copy given or cached: 28x28 comes from the embedded copy; other sizes are downloaded."""
    monkeypatch.setenv("LIGHTFLAX_SHARED_DIR", str(tmp_path / "noshared"))
    assert data.available("pneumonia_mnist")
    assert data.load("pneumonia_mnist").source.startswith("embedded")
    assert not data.available("pneumonia_mnist", stored_size=64)
    with pytest.raises(DataError, match="offline test: not downloading"):
        data.load("pneumonia_mnist", stored_size=64)
    with pytest.raises(DataError, match=r"PneumoniaMNIST not found \(looked in .*--dataset=synthetic"):
        data.load("pneumonia_mnist", stored_size=64, download=False)


@pytest.mark.skipif(not SHARED_NPZ.is_file(), reason=f"real PneumoniaMNIST not present at {SHARED_NPZ}")
def test_real_pneumonia_mnist_from_shared_equals_embedded():
    d = data.load("pneumonia_mnist", data_dir=str(SHARED_NPZ))
    assert d.source == str(SHARED_NPZ)
    emb = data.load("pneumonia_mnist")
    assert emb.source.startswith("embedded")
    for split in ("train", "val"):
        np.testing.assert_array_equal(d.splits[split].images, emb.splits[split].images)
        np.testing.assert_array_equal(d.splits[split].labels, emb.splits[split].labels)


# ----------------------------------------------------------------------------
# mnist / fashion_mnist from IDX
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_builders(tmp_path, name):
    raw = idx_folder(tmp_path / "idx")
    d = data.load(name, data_dir=str(tmp_path / "idx"))
    assert d.num_classes == 10 and len(d.class_names) == 10
    assert (d.class_names[0] == "T-shirt/top") == (name == "fashion_mnist")
    np.testing.assert_array_equal(d.splits["test"].images[..., 0], raw["test"][0])
    np.testing.assert_array_equal(d.splits["test"].labels, raw["test"][1])
    tr, va = d.splits["train"], d.splits["val"]
    assert tr.images.shape[1:] == (28, 28, 1) and tr.images.dtype == np.uint8 and tr.labels.dtype == np.int32
    assert len(tr) + len(va) == 30 and len(va) == 3  # tiny sets: a 10 % hold-out
    from lightflax.data.mnist import holdout

    t_idx, v_idx = holdout(30)
    assert not set(t_idx) & set(v_idx)
    np.testing.assert_array_equal(va.images[..., 0], raw["train"][0][v_idx])
    np.testing.assert_array_equal(tr.labels, raw["train"][1][t_idx])
    assert any("hold-out" in n for n in d.notes)


def test_idx_without_holdout_keeps_the_whole_training_set(tmp_path):
    """holdout=False (--paper_protocol): all official training images, stored order, no val."""
    raw = idx_folder(tmp_path / "idx")
    d = data.load("fashion_mnist", data_dir=str(tmp_path / "idx"), holdout=False)
    assert d.splits["val"] is None
    np.testing.assert_array_equal(d.splits["train"].images[..., 0], raw["train"][0])
    np.testing.assert_array_equal(d.splits["train"].labels, raw["train"][1])
    assert any("no hold-out" in n for n in d.notes)


def test_idx_holdout_is_5000_and_fixed():
    from lightflax.data.mnist import holdout

    t, v = holdout(60000)
    assert len(v) == 5000 and len(t) == 55000 and not set(t) & set(v)
    np.testing.assert_array_equal(v, holdout(60000)[1])


def test_idx_errors(tmp_path):
    from lightflax.data import idx

    with pytest.raises(DataError, match="IDX files not found"):
        data.load("mnist", data_dir=str(tmp_path / "none"))
    (tmp_path / "bad.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable IDX"):
        idx.read(tmp_path / "bad.gz")
    idx.write(tmp_path / "short", np.zeros((4, 3), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(DataError, match="re-download"):
        idx.read(tmp_path / "short")
    a = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    idx.write(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(idx.read(tmp_path / "a.gz"), a)


# ----------------------------------------------------------------------------
# synthetic and the common entry point
# ----------------------------------------------------------------------------


def test_synthetic():
    d = data.load("synthetic", synthetic_shape=(9, 7, 3), num_classes=5, synthetic_sizes={"train": 20, "val": 4},
                  seed=3)
    assert d.synthetic and "synthetic" in d.notes[0] and d.source == "synthetic"
    assert d.splits["train"].images.shape == (20, 9, 7, 3) and d.splits["test"] is None
    assert d.splits["train"].labels.max() < 5
    again = data.load("synthetic", synthetic_shape=(9, 7, 3), num_classes=5, synthetic_sizes={"train": 20}, seed=3)
    np.testing.assert_array_equal(again.splits["train"].images, d.splits["train"].images)
    other = data.load("synthetic", synthetic_shape=(9, 7, 3), num_classes=5, synthetic_sizes={"train": 20}, seed=4)
    assert not np.array_equal(other.splits["train"].images, d.splits["train"].images)
    with pytest.raises(DataError):
        data.load("synthetic", synthetic_shape=(9, 7))


def test_unknown_dataset_and_cifar_without_tf():
    import importlib.util

    assert set(data.DATASETS) == {"chest_xray", "pneumonia_mnist", "fashion_mnist", "mnist", "cifar10",
                                  "cifar100", "synthetic"}
    with pytest.raises(DataError, match="unknown --dataset"):
        data.load("imagenet")
    if importlib.util.find_spec("tensorflow") is None:
        with pytest.raises(DataError, match="needs TensorFlow"):
            data.load("cifar10")
        assert not data.available("cifar100")
