"""Data reliability: the embedded PneumoniaMNIST copy, label checks, 16-bit PNG decoding,
and no writes outside the places a loader is told to use (issues 15 and 16)."""

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lightflax import data
from lightflax.data import chest_xray, pneumonia_mnist, tfds_util
from lightflax.errors import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Cache, home and temp dir point into tmp_path; no shared folder; no download."""
    monkeypatch.setenv("LIGHTFLAX_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LIGHTFLAX_SHARED_DIR", str(tmp_path / "noshared"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    (tmp_path / "systmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systmp"))

    def no_download(url, *a, **k):
        raise DataError(f"offline test: not downloading {url}")

    monkeypatch.setattr("lightflax.data.locations.download", no_download)


def _tree(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ----------------------------------------------------------------------------
# the embedded copy
# ----------------------------------------------------------------------------

EMBEDDED_CONTENT = {"train": "988575a9306444dd842d68074a0a712bdbda58370717b7a2dd17c8a40d567ecd",
                    "val": "18d544425c7ad053ac265e109654a65a09b23a908a7c66f58bb8a8fe059a1286"}


def test_embedded_copy_is_the_default_and_real(tmp_path, capsys):
    d = data.load("pneumonia_mnist")
    assert d.source.startswith("embedded") and "sha256 verified" in d.source and not d.synthetic
    assert d.notes[0] == pneumonia_mnist.EMBEDDED_NOTE and "\n" not in d.notes[0]
    assert np.bincount(d.splits["train"].labels).tolist() == [1214, 3494]
    assert np.bincount(d.splits["val"].labels).tolist() == [135, 389]
    assert d.splits["test"] is None and any("no test split" in n for n in d.notes)
    assert any(n.startswith("8 val image(s) also occur") for n in d.notes)
    for split, digest in EMBEDDED_CONTENT.items():  # sha256 of images + labels, from the data's README
        s = d.splits[split]
        assert s.images.shape[1:] == (28, 28, 1) and s.images.dtype == np.uint8
        assert hashlib.sha256(s.images[..., 0].tobytes() + s.labels.astype(np.uint8).tobytes()).hexdigest() == digest
    # loading wrote nothing: no cache, no home files, no temp folders
    assert _tree(tmp_path / "cache") == [] and _tree(tmp_path / "home") == [] and _tree(tmp_path / "systmp") == []
    assert "WARNING" not in capsys.readouterr().err


def test_cached_copy_wins_over_embedded(tmp_path):
    folder = tmp_path / "cache" / "pneumonia_mnist"
    folder.mkdir(parents=True)
    _npz(folder / "pneumoniamnist.npz", {"train": 6, "val": 4, "test": 4})
    d = data.load("pneumonia_mnist")
    assert d.source == str(folder / "pneumoniamnist.npz") and len(d.splits["test"]) == 4
    assert pneumonia_mnist.EMBEDDED_NOTE not in d.notes


def test_explicit_data_dir_without_data_is_an_error_not_a_fallback(tmp_path):
    (tmp_path / "empty").mkdir()
    for given in (tmp_path / "empty", tmp_path / "missing", tmp_path / "missing.npz"):
        with pytest.raises(DataError, match="PneumoniaMNIST not found") as e:
            data.load("pneumonia_mnist", data_dir=str(given))
        assert f"--data_dir {given} is neither" in str(e.value) and "\n" not in str(e.value)
        assert not data.available("pneumonia_mnist", data_dir=str(given))


def test_damaged_or_missing_embedded_copy_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / pneumonia_mnist.EMBEDDED_FILE
    raw = bytearray(pneumonia_mnist.embedded_path().read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))
    monkeypatch.setattr(pneumonia_mnist, "embedded_path", lambda: bad)
    with pytest.raises(DataError, match=r"embedded PneumoniaMNIST copy .* is damaged .*reinstall") as e:
        data.load("pneumonia_mnist")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(pneumonia_mnist, "embedded_path", lambda: tmp_path / "gone.npz")
    with pytest.raises(DataError, match="PneumoniaMNIST not found"):
        data.load("pneumonia_mnist", download=False)
    with pytest.raises(DataError, match="embedded PneumoniaMNIST copy is missing"):
        pneumonia_mnist.verify_embedded()


def test_embedded_copy_can_be_refused():
    with pytest.raises(DataError, match="not found"):
        pneumonia_mnist.load(embedded_ok=False, download_ok=False)


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="setuptools not installed")
def test_wheel_ships_the_embedded_copy_and_notice(tmp_path):
    """A non-editable build (pip wheel, offline, from a copy of the sources) holds the npz and NOTICE."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "NOTICE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "lightflax", src / "lightflax", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path / "wheel"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("lightflax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        npz = z.read("lightflax/data/embedded/" + pneumonia_mnist.EMBEDDED_FILE)
        assert "lightflax/data/embedded/README.md" in names
        assert any(n.endswith("/NOTICE") and ".dist-info/" in n for n in names)
    assert hashlib.sha256(npz).hexdigest() == pneumonia_mnist.EMBEDDED_SHA256
    readme = pneumonia_mnist.embedded_path().with_name("README.md").read_text()
    assert pneumonia_mnist.EMBEDDED_SHA256 in readme and "CC BY 4.0" in readme
    assert "CC BY 4.0" in (REPO / "NOTICE").read_text()


# ----------------------------------------------------------------------------
# labels and splits (issue 15 item 7)
# ----------------------------------------------------------------------------


def _npz(path: Path, sizes, labels=None, size=28):
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in sizes.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        lab = (np.arange(n) % 3 == 0).astype(np.uint8) if labels is None or split not in labels else labels[split]
        arrays[f"{split}_labels"] = lab
    np.savez_compressed(path, **arrays)
    return arrays


@pytest.mark.parametrize("labels", [np.array([0.0, 1.0, 1.0, 0.0]), np.array([[0], [1], [1], [0]], np.int64),
                                    np.array([False, True, True, False])])
def test_integral_labels_of_any_integral_kind_are_accepted(tmp_path, labels):
    _npz(tmp_path / "p.npz", {"train": 4, "val": 3}, labels={"train": labels})
    d = data.load("pneumonia_mnist", data_dir=str(tmp_path / "p.npz"))
    np.testing.assert_array_equal(d.splits["train"].labels, [0, 1, 1, 0])
    assert d.splits["train"].labels.dtype == np.int32


@pytest.mark.parametrize("labels,match", [
    (np.array([0.0, 0.7, 1.0, 0.0]), r"non-integral label\(s\) \(first 0.7 at index 1\)"),
    (np.array([0.0, np.nan, 1.0, np.nan]), r"2 NaN label\(s\) \(first at index 1\)"),
    (np.array([0, 2, 1, 0]), r"outside \{0, 1\} \(first 2 at index 1\)"),
    (np.array([0, -1, 1, 0]), r"outside \{0, 1\}"),
    (np.array(["0", "1", "1", "0"]), r"dtype <U1"),
    (np.array([0, 1, 1]), r"must be 4 labels"),
])
def test_bad_labels_are_one_line_errors(tmp_path, labels, match):
    _npz(tmp_path / "p.npz", {"train": 4, "val": 3}, labels={"train": labels})
    with pytest.raises(DataError, match=match) as e:
        data.load("pneumonia_mnist", data_dir=str(tmp_path / "p.npz"))
    assert "\n" not in str(e.value) and "train_labels" in str(e.value)


def test_empty_splits(tmp_path):
    _npz(tmp_path / "p.npz", {"train": 0, "val": 3})
    with pytest.raises(DataError, match="the train split is empty"):
        data.load("pneumonia_mnist", data_dir=str(tmp_path / "p.npz"))
    _npz(tmp_path / "q.npz", {"train": 4, "val": 3, "test": 0})
    assert data.load("pneumonia_mnist", data_dir=str(tmp_path / "q.npz")).splits["test"] is None


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_single_class_val_or_test_split_is_refused(tmp_path, split):
    _npz(tmp_path / "p.npz", {"train": 4, "val": 3, "test": 3}, labels={split: np.ones(3, np.uint8)})
    with pytest.raises(DataError) as e:
        data.load("pneumonia_mnist", data_dir=str(tmp_path / "p.npz"))
    msg = str(e.value)
    assert "\n" not in msg and f"the {split} split of {tmp_path / 'p.npz'} holds a single class (pneumonia, 3" in msg
    assert "both classes" in msg


def test_mixed_sizes_and_pickles_rejected(tmp_path):
    arrays = _npz(tmp_path / "p.npz", {"train": 4, "val": 3})
    arrays["val_images"] = np.zeros((3, 64, 64), np.uint8)
    np.savez(tmp_path / "mixed.npz", **arrays)
    with pytest.raises(DataError, match="different sizes"):
        data.load("pneumonia_mnist", data_dir=str(tmp_path / "mixed.npz"))
    arrays["val_images"] = np.zeros((3, 28, 28), np.uint8)
    arrays["val_labels"] = np.array([0, 1, None], object)
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(DataError, match="not a readable npz"):
        data.load("pneumonia_mnist", data_dir=str(tmp_path / "obj.npz"))


# ----------------------------------------------------------------------------
# writes: none for pneumonia_mnist; TFDS preparation cleans up (issue 15 item 10)
# ----------------------------------------------------------------------------


def test_pneumonia_mnist_from_data_dir_writes_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _npz(src / "pneumoniamnist.npz", {"train": 6, "val": 3})
    before = _tree(src)
    for given in (src, src / "pneumoniamnist.npz"):
        data.load("pneumonia_mnist", data_dir=str(given))
    assert _tree(src) == before
    for place in ("cache", "home", "systmp"):
        assert _tree(tmp_path / place) == [], place


def test_tfds_preparation_leaves_no_temp_folder_and_reads_back(tmp_path):
    arrays = _npz(tmp_path / "p.npz", {"train": 6, "val": 3})
    builder = pneumonia_mnist.prepare_tfds(tmp_path / "p.npz", tmp_path / "prepared")
    got = tfds_util.read_all(builder, ("train", "val"))
    np.testing.assert_array_equal(got["train"][0][..., 0], arrays["train_images"])
    assert _tree(tmp_path / "systmp") == []  # TFDS's mkdtemp("tfds") went into a private, removed folder
    assert tempfile.tempdir == str(tmp_path / "systmp")  # restored


def test_failed_preparation_removes_what_it_created(tmp_path):
    _npz(tmp_path / "bad.npz", {"train": 4, "val": 3}, labels={"train": np.array([0, 5, 1, 0])})
    with pytest.raises(DataError, match="outside"):
        pneumonia_mnist.prepare_tfds(tmp_path / "bad.npz", tmp_path / "new" / "tfds" / "x")
    assert not (tmp_path / "new").exists()
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="outside"):
        pneumonia_mnist.prepare_tfds(tmp_path / "bad.npz", tmp_path / "existing")
    assert _tree(tmp_path / "existing") == ["keep.txt"]
    assert _tree(tmp_path / "systmp") == []


def test_chest_xray_all_images_corrupt_is_one_line_and_cleaned_up(tmp_path):
    root = tmp_path / "chest_xray"
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "a.jpeg").write_bytes(b"\xff\xd8 not an image")
    with pytest.raises(DataError, match="no readable example") as e:
        data.load("chest_xray", manual_dir=str(root), data_dir=str(tmp_path / "prep"), stored_size=64)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "prep").exists() and _tree(tmp_path / "systmp") == []


# ----------------------------------------------------------------------------
# 16-bit grayscale decoding (issue 15 item 1)
# ----------------------------------------------------------------------------


def _gray8(seed=0, shape=(20, 24)):
    img = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
    img[0, 0], img[-1, -1] = 0, 255  # full range
    return img


def _png(path: Path, image, mode=None, sbit=None):
    from PIL import Image, PngImagePlugin

    im = Image.frombytes(mode, image.shape[::-1], image.tobytes()) if mode else Image.fromarray(image)
    info = None
    if sbit is not None:
        info = PngImagePlugin.PngInfo()
        info.add(b"sBIT", bytes([sbit]))
    im.save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("resolution", [24, 64])
def test_16bit_png_equals_the_8bit_image(tmp_path, resolution):
    g = _gray8()
    want = chest_xray.decode(_png(tmp_path / "8.png", g), resolution)
    from PIL import Image

    with Image.open(_png(tmp_path / "16.png", g.astype(np.uint16) * 257)) as im:
        assert im.mode.startswith("I;16")  # really a 16-bit file
    got = chest_xray.decode(tmp_path / "16.png", resolution)
    np.testing.assert_array_equal(got, want)
    assert got.mean() < 250  # not the all-white image convert("L") made


def test_12bit_in_16bit_png_scaled_by_4095(tmp_path):
    g = _gray8(1)
    v12 = np.rint(g.astype(np.float64) * 4095 / 255).astype(np.uint16)
    want = chest_xray.decode(_png(tmp_path / "8.png", g), 24)
    np.testing.assert_array_equal(chest_xray.decode(_png(tmp_path / "12.png", v12), 24), want)
    # a dark 12-bit image (max 2000): the depth rounds up to 12 bits, not down to 11
    dark = (v12 // 2).astype(np.uint16)
    got = chest_xray.decode(_png(tmp_path / "dark.png", dark), 24)
    want_dark = chest_xray.decode(_png(tmp_path / "dark8.png", np.rint(dark / 4095 * 255).astype(np.uint8)), 24)
    np.testing.assert_array_equal(got, want_dark)
    # sBIT says 12 bits: scale by 4095 even when the maximum would suggest fewer
    assert chest_xray.png_significant_bits(_png(tmp_path / "s.png", dark, sbit=12)) == 12
    np.testing.assert_array_equal(chest_xray.decode(tmp_path / "s.png", 24), got)
    assert chest_xray.png_significant_bits(tmp_path / "8.png") is None


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_depth_modes(mode):
    from PIL import Image

    g = _gray8(2)
    if mode == "I;16":
        im = Image.frombytes(mode, g.shape[::-1], (g.astype("<u2") * 257).tobytes())
    elif mode == "I;16B":
        im = Image.frombytes(mode, g.shape[::-1], (g.astype(">u2") * 257).tobytes())
    elif mode == "I":
        im = Image.frombytes(mode, g.shape[::-1], (g.astype("<i4") * 257).tobytes())
    else:
        im = Image.frombytes(mode, g.shape[::-1], (g.astype("<f4") / 255).tobytes())
    assert im.mode == mode
    out = chest_xray.to_gray8(im)
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), g)


def test_high_depth_values_that_cannot_be_scaled_are_reported():
    from PIL import Image

    neg = Image.frombytes("I", (2, 1), np.array([-5, 100], "<i4").tobytes())
    with pytest.raises(ValueError, match="negative"):
        chest_xray.to_gray8(neg)
    nan = Image.frombytes("F", (2, 1), np.array([np.nan, 0.5], "<f4").tobytes())
    with pytest.raises(ValueError, match="NaN"):
        chest_xray.to_gray8(nan)
    over = Image.frombytes("I;16", (2, 1), np.array([0, 5000], "<u2").tobytes())
    with pytest.raises(ValueError, match="above its 12-bit depth"):
        chest_xray.to_gray8(over, significant_bits=12)
    assert chest_xray.bit_depth(np.array([0, 255])) == 8 and chest_xray.bit_depth(np.array([1023])) == 10
    assert chest_xray.bit_depth(np.array([1024])) == 12 and chest_xray.bit_depth(np.array([40000])) == 16


def test_16bit_pngs_through_the_builder(tmp_path):
    root = tmp_path / "chest_xray"
    g = _gray8(3)
    for split in ("train", "test"):
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            (root / split / cls).mkdir(parents=True)
            _png(root / split / cls / "a.png", (g.astype(np.uint16) * 257) if label else g)
    d = data.load("chest_xray", manual_dir=str(root), data_dir=str(tmp_path / "prep"), stored_size=64)
    imgs = d.splits["train"].images[..., 0]
    np.testing.assert_array_equal(imgs[0], imgs[1])  # the 16-bit copy decodes like the 8-bit one
    assert _tree(tmp_path / "systmp") == []


def test_tiny_images_warn_on_stderr(tmp_path, capsys):
    root = tmp_path / "chest_xray"
    g = np.full((40, 40), 128, np.uint8)
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True)
            _png(root / split / cls / "a.png", g)
    _png(root / "train" / "NORMAL" / "dot.png", np.zeros((1, 1), np.uint8))
    d = data.load("chest_xray", manual_dir=str(root), data_dir=str(tmp_path / "prep"), stored_size=64)
    out, err = capsys.readouterr()
    assert "WARNING: 1 image(s) in" in err and "smaller than 32x32" in err and "dot.png (1x1)" in err
    assert "WARNING" not in out  # warnings go to stderr, as pneumonia_mnist's and the README say
    assert len(d.splits["train"]) == 3 and any("smaller than 32x32" in n for n in d.notes)


def test_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    import urllib.request

    from lightflax.data import locations

    monkeypatch.undo()  # the real locations.download, with the network cut below
    monkeypatch.setenv("LIGHTFLAX_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def offline(*a, **k):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="(could not|cannot) download .*network unreachable"):
        data.load("pneumonia_mnist", stored_size=64)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "home").exists()


def test_failed_preparation_of_a_second_config_keeps_the_first(tmp_path):
    _npz(tmp_path / "p.npz", {"train": 4, "val": 3})
    first = pneumonia_mnist.prepare_tfds(tmp_path / "p.npz", tmp_path / "prep")
    before = _tree(tmp_path / "prep")
    with pytest.raises(DataError, match="not 64x64"):
        pneumonia_mnist.prepare_tfds(tmp_path / "p.npz", tmp_path / "prep", size=64)
    assert _tree(tmp_path / "prep") == before  # nothing of the failed 64 config left, the 28 one intact
    assert len(tfds_util.read_all(first, ("train",))["train"][1]) == 4
    files = sorted(p for p in (tmp_path / "prep").rglob("*") if p.is_file())
    (tmp_path / "prep" / "empty" / "nested").mkdir(parents=True)
    tfds_util.prune_empty_dirs(tmp_path / "prep")
    assert sorted(p for p in (tmp_path / "prep").rglob("*") if p.is_file()) == files  # files never removed
    assert not (tmp_path / "prep" / "empty").exists()
    assert all(any(p.iterdir()) for p in (tmp_path / "prep").rglob("*") if p.is_dir())
