"""InceptionV3 conformance: Keras 3 (JAX backend) and the Flax port load the same
legacy-layout HDF5 file of random weights and must agree on random images.

Also: the legacy-HDF5 loader's errors (truncated file, wrong shapes, missing
weights). The 88 MB random-weight file is generated once per session in a tmp dir.
"""

import os
import re

import jax
import numpy as np
import pytest

from lightflax import pretrained, param_counts
from lightflax.errors import CheckpointError
from keras_h5_writer import write_weights
from lightflax.pretrained import inception_v3, keras_h5
from lightflax.pretrained.backbone import abstract_variables_and_order

SIZE = 139  # smallest size where every stage keeps > 1x1 (final map 3x3); Keras minimum is 75


def _keras():
    os.environ["KERAS_BACKEND"] = "jax"
    keras = pytest.importorskip("keras", reason="keras not installed (pip install -e .[test])")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras already imported with backend {keras.backend.backend()}, need jax")
    return keras


def _creation_number(layer_name: str) -> int:
    """Keras 3 auto-names layers '<prefix>' then '<prefix>_1', ... in creation order."""
    m = re.fullmatch(r"(?:conv2d|batch_normalization)(?:_(\d+))?", layer_name)
    assert m, layer_name
    return int(m.group(1) or 0)


def _random_layer_weights(layer, rng):
    """[(weight short name, array)] with values that keep activations O(1)."""
    out = []
    for w in layer.trainable_weights + layer.non_trainable_weights:  # the legacy-h5 order
        short = w.path.split("/")[-1]
        shape = tuple(w.shape)
        if short == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        elif short == "moving_variance":
            a = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # beta, moving_mean, bias
            a = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        out.append((short, a))
    return out


@pytest.fixture(scope="session")
def keras_inception(tmp_path_factory):
    """(keras model with top, path of the top file, path of the no-top file), random weights."""
    keras = _keras()
    keras.utils.set_random_seed(0)
    model = keras.applications.InceptionV3(weights=None, include_top=True, input_shape=(SIZE, SIZE, 3),
                                           classifier_activation=None)
    # Keras-2 names: 1-based rank of the creation number, one counter per layer type.
    ranks = {}
    for prefix in ("conv2d", "batch_normalization"):
        auto = sorted((layer for layer in model.layers if re.fullmatch(rf"{prefix}(_\d+)?", layer.name)),
                      key=lambda layer: _creation_number(layer.name))
        ranks.update({layer.name: f"{prefix}_{i}" for i, layer in enumerate(auto, start=1)})
    rng = np.random.default_rng(0)
    layers = [(ranks.get(layer.name, layer.name), _random_layer_weights(layer, rng)) for layer in model.layers]
    d = tmp_path_factory.mktemp("inception")
    top, notop = str(d / "random_top.h5"), str(d / "random_notop.h5")
    write_weights(top, layers)
    write_weights(notop, [(n, w) for n, w in layers if n != "predictions"])
    model.load_weights(top)  # Keras loads legacy files by position
    return keras, model, top, notop


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_flax_inception_matches_keras_on_same_file(keras_inception):
    keras, model, top, notop = keras_inception
    x = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    want_logits = np.asarray(model.predict(x, verbose=0))
    want_map = np.asarray(keras.Model(model.inputs, model.get_layer("mixed10").output).predict(x, verbose=0))

    m_top = inception_v3.InceptionV3(include_top=True)
    logits = jax.jit(m_top.apply)(pretrained.load_variables("inception_v3", top, True, m_top), x)
    m_map = inception_v3.InceptionV3(pooling=None)
    fmap = jax.jit(m_map.apply)(pretrained.load_variables("inception_v3", notop, False, m_map), x)

    assert fmap.shape == want_map.shape == (2, 3, 3, 2048)
    assert np.std(want_map) > 1e-2 and np.std(want_logits) > 1e-2  # a meaningful comparison
    assert _rel_err(fmap, want_map) < 1e-4
    assert _rel_err(logits, want_logits) < 1e-4


def test_keras_parameter_counts_match(keras_inception):
    keras = keras_inception[0]
    kmodel = keras.applications.InceptionV3(weights=None, include_top=False, pooling="avg",
                                            input_shape=(299, 299, 3))
    counts = param_counts.variables_counts(abstract_variables_and_order(pretrained.build("inception_v3"), 299)[0])
    assert counts["total"] == kmodel.count_params() == 21_802_784
    assert counts["trainable"] == sum(int(np.prod(w.shape)) for w in kmodel.trainable_weights) == 21_768_352


def test_load_from_path_and_wrong_include_top(keras_inception, tmp_path):
    _, _, top, notop = keras_inception
    bb = pretrained.load("inception_v3", path=notop)
    assert bb.weights_path == os.path.abspath(notop) and bb.feature_dim == 2048
    img = np.random.default_rng(2).integers(0, 256, (1, 80, 90, 1), dtype=np.uint8)
    x = bb.preprocess(img)
    assert x.shape == (1, 299, 299, 3) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert bb.apply(x).shape == (1, 2048)
    with pytest.raises(CheckpointError, match=r"random_notop\.h5: weight predictions/kernel "
                                              r"\(expected shape \(2048, 1000\)\) is missing"):
        pretrained.load("inception_v3", path=notop, include_top=True)


def test_truncated_h5_is_one_line_error(tmp_path):
    whole = tmp_path / "whole.h5"
    write_weights(whole, [("conv2d_1", [("kernel", np.ones((3, 3, 3, 32), np.float32))])])
    bad = tmp_path / "truncated.h5"
    bad.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        pretrained.load("inception_v3", path=str(bad))
    msg = str(e.value)
    assert "truncated.h5" in msg and "not a readable HDF5 file" in msg and "\n" not in msg


def _first_layers(n_conv_correct: bool):
    k = (3, 3, 3, 32) if n_conv_correct else (3, 3, 3, 64)
    return [("input_1", []), ("conv2d_1", [("kernel", np.zeros(k, np.float32))])]


def test_h5_of_other_architecture_names_first_mismatch(tmp_path):
    other = tmp_path / "other.h5"
    write_weights(other, _first_layers(False))
    with pytest.raises(CheckpointError, match=r"other\.h5: weight conv2d_1/conv2d_1/kernel:0: "
                                              r"expected shape \(3, 3, 3, 32\), found \(3, 3, 3, 64\)"):
        pretrained.load("inception_v3", path=str(other))
    short = tmp_path / "short.h5"
    write_weights(short, _first_layers(True))
    with pytest.raises(CheckpointError, match=r"short\.h5: weight batch_normalization_1/beta "
                                              r"\(expected shape \(32,\)\) is missing"):
        pretrained.load("inception_v3", path=str(short))


def test_h5_with_extra_layers_is_refused(keras_inception, tmp_path):
    import h5py

    extra = tmp_path / "extra.h5"
    with h5py.File(keras_inception[3], "r") as src, h5py.File(extra, "w") as dst:
        for k in src:
            src.copy(src[k], dst, name=k)
        for k, v in src.attrs.items():
            dst.attrs[k] = v
    layers = [(n, [("kernel", np.zeros((1, 1, 2048, 8), np.float32))]) for n in ["conv2d_95"]]
    with h5py.File(extra, "a") as f:
        f.attrs["layer_names"] = np.concatenate([f.attrs["layer_names"], np.array([b"conv2d_95"])])
        g = f.create_group(layers[0][0])
        g.create_dataset("conv2d_95/kernel:0", data=layers[0][1][0][1])
        g.attrs["weight_names"] = np.array([b"conv2d_95/kernel:0"])
    with pytest.raises(CheckpointError, match=r"unexpected weight conv2d_95/conv2d_95/kernel:0"):
        pretrained.load("inception_v3", path=str(extra))


def test_renumber_keras3_and_keras2_names():
    got = keras_h5.renumber(["conv2d", "conv2d_2", "conv2d_1", "batch_normalization_7", "mixed0"],
                            inception_v3.AUTO_PREFIXES)
    assert got == {"conv2d": "conv2d_1", "conv2d_1": "conv2d_2", "conv2d_2": "conv2d_3",
                   "batch_normalization_7": "batch_normalization_1", "mixed0": "mixed0"}
