"""ResNet50, Xception (vs Keras 3) and SE-ResNet50 (vs its PyTorch definition) conformance.

Keras builds ResNet50 / Xception with random weights (``weights=None``, then every
weight, BatchNorm statistics included, set to random values) and writes them with
its own legacy-HDF5 writer, so the file carries the layer names Keras writes;
lightflax loads that file and must reproduce Keras' features and logits on random
inputs, in inference mode, at the smallest input Keras accepts. SE-ResNet50: the
module below follows pretrainedmodels' senet.py (SEModule, SEResNetBottleneck with
the stride on the first 1x1, downsample kernel 1, layer0 with a ceil-mode max pool,
AvgPool2d(7), last_linear), random weights saved with torch.save, read by the
restricted torch reader. Also: exact parameter counts, preprocessing against each
original's, minimum input sizes, trunk/tail split, and the one-line errors.
"""

from collections import OrderedDict

import jax
import numpy as np
import pytest

from lightflax import param_counts, pretrained
from lightflax.errors import CheckpointError, UserError
from lightflax.pretrained import resnet50, se_resnet50, xception
from lightflax.pretrained.backbone import abstract_variables_and_order
from keras_h5_writer import write_weights
from test_pretrained_keras import _keras, _rel_err

TOL = 1e-5  # relative to the largest output magnitude


def _random_weights(model, rng):
    """Every weight of ``model`` random, with scales that keep activations O(1)."""
    for layer in model.layers:
        values = []
        for w in layer.weights:
            short, shape = w.path.split("/")[-1], tuple(w.shape)
            if short.endswith("kernel"):
                fan_in = int(np.prod(shape[:2] if short == "depthwise_kernel" else shape[:-1]))
                values.append(rng.standard_normal(shape) * np.sqrt(2.0 / fan_in))
            elif short in ("moving_variance", "gamma"):
                values.append(rng.uniform(0.5, 1.5, shape))
            else:  # beta, moving_mean, bias
                values.append(0.1 * rng.standard_normal(shape))
        if values:
            layer.set_weights([v.astype(np.float32) for v in values])


def _write_keras_h5(model, path):
    """Keras' own legacy-HDF5 writer (what ``save_weights('x.h5')`` wrote in Keras 2)."""
    import warnings

    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2's __array__(copy=...) notice, inside Keras
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


KERAS_MODELS = {"resnet50": ("ResNet50", resnet50, "avg_pool"), "xception": ("Xception", xception, "avg_pool")}


@pytest.fixture(scope="module", params=sorted(KERAS_MODELS))
def keras_pair(request, tmp_path_factory):
    """(name, keras model with top at the minimum size, path of its .h5 written by Keras)."""
    keras = _keras()
    name = request.param
    cls, mod, _ = KERAS_MODELS[name]
    keras.utils.set_random_seed(0)
    size = mod.MIN_SIZE
    model = getattr(keras.applications, cls)(weights=None, include_top=True, input_shape=(size, size, 3),
                                             classifier_activation=None)
    _random_weights(model, np.random.default_rng(0))
    path = str(tmp_path_factory.mktemp(name) / f"{name}_random.h5")
    _write_keras_h5(model, path)
    return name, keras, model, path


def test_keras_backbone_matches_keras_on_its_own_file(keras_pair):
    name, keras, model, path = keras_pair
    _, mod, pool_layer = KERAS_MODELS[name]
    size = mod.MIN_SIZE
    x = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    both = keras.Model(model.inputs, [model.get_layer(pool_layer).output, model.output])
    want_feats, want_logits = (np.asarray(a) for a in both.predict(x, verbose=0))
    top = pretrained.build(name, include_top=True)
    logits = jax.jit(top.apply)(pretrained.load_variables(name, path, True, top), x)
    notop = pretrained.build(name)
    feats = jax.jit(notop.apply)(pretrained.load_variables(name, path, False, notop), x)
    assert feats.shape == want_feats.shape == (2, 2048) and logits.shape == (2, 1000)
    assert np.std(want_feats) > 1e-2 and np.std(want_logits) > 1e-2  # a meaningful comparison
    assert _rel_err(feats, want_feats) < TOL
    assert _rel_err(logits, want_logits) < TOL


def test_keras_parameter_counts_and_minimum_size(keras_pair):
    name, keras, model, _ = keras_pair
    cls, mod, _ = KERAS_MODELS[name]
    variables, _ = abstract_variables_and_order(pretrained.build(name, include_top=True), mod.MIN_SIZE)
    counts = param_counts.variables_counts(variables)
    published = {"resnet50": 25_636_712, "xception": 22_910_480}[name]
    assert counts["total"] == model.count_params() == published
    assert counts["trainable"] == sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    small = mod.MIN_SIZE - 1
    with pytest.raises(ValueError, match=f"at least {mod.MIN_SIZE}"):  # Keras' own minimum
        getattr(keras.applications, cls)(weights=None, input_shape=(small, small, 3))
    x = np.zeros((1, small, small, 3), np.float32)
    with pytest.raises(ValueError, match=rf"^{mod.ARCH} takes \(N, H, W, 3\) inputs of at least "
                                         rf"{mod.MIN_SIZE}x{mod.MIN_SIZE}, got shape \(1, {small}, {small}, 3\)"):
        pretrained.build(name).init(__import__("jax").random.key(0), x)


def test_keras_preprocessing_equals_keras(keras_pair):
    name, keras, _, path = keras_pair
    size = KERAS_MODELS[name][1].MIN_SIZE
    images = np.random.default_rng(3).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    bb = pretrained.load(name, path=path, resolution=size)
    want = getattr(keras.applications, name).preprocess_input(images.astype(np.float32))
    np.testing.assert_allclose(np.asarray(bb.preprocess(images)), want, rtol=0, atol=1e-4)


def test_wrong_architecture_h5_names_expected_and_found(keras_pair):
    name, _, _, path = keras_pair
    other = "xception" if name == "resnet50" else "resnet50"
    first = {"resnet50": "conv1_conv/kernel", "xception": "block1_conv1/kernel"}
    with pytest.raises(CheckpointError) as e:
        pretrained.load_variables(other, path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: weight {first[other]} ")
    assert f"not {KERAS_MODELS[other][0]} weights" in msg and f"found: {first[name].split('/')[0]}" in msg


def test_truncated_h5_is_one_line_error(keras_pair, tmp_path):
    name, _, _, path = keras_pair
    cut = tmp_path / "cut.h5"
    with open(path, "rb") as f:
        cut.write_bytes(f.read(100_000))
    with pytest.raises(CheckpointError) as e:
        pretrained.load(name, path=str(cut))
    msg = str(e.value)
    assert "\n" not in msg and "cut.h5" in msg and f"expected the Keras {KERAS_MODELS[name][0]} .h5 weights" in msg


# ---------------------------------------------------------------- SE-ResNet50 vs its PyTorch definition

def _torch_senet():
    """pretrainedmodels' se_resnet50 (senet.py), written out: SENet(SEResNetBottleneck, [3, 4, 6, 3],
    groups=1, reduction=16, dropout_p=None, inplanes=64, input_3x3=False, downsample_kernel_size=1,
    downsample_padding=0)."""
    torch = pytest.importorskip("torch", reason="torch not installed (pip install -e .[test])")
    nn = torch.nn

    class SEModule(nn.Module):
        def __init__(self, channels, reduction):
            super().__init__()
            self.avg_pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0)
            self.relu = nn.ReLU(inplace=True)
            self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0)
            self.sigmoid = nn.Sigmoid()

        def forward(self, x):
            return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))

    class SEResNetBottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, reduction, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False, stride=stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.se_module = SEModule(planes * 4, reduction=reduction)
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            residual = self.downsample(x) if self.downsample is not None else x
            return self.relu(self.se_module(out) + residual)

    class SENet(nn.Module):
        def __init__(self, layers=(3, 4, 6, 3), reduction=16, num_classes=1000):
            super().__init__()
            self.inplanes = 64
            self.layer0 = nn.Sequential(OrderedDict([
                ("conv1", nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)),
                ("bn1", nn.BatchNorm2d(64)), ("relu1", nn.ReLU(inplace=True)),
                ("pool", nn.MaxPool2d(3, stride=2, ceil_mode=True))]))
            for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
                setattr(self, f"layer{i}", self._make_layer(planes, n, reduction, stride=1 if i == 1 else 2))
            self.avg_pool = nn.AvgPool2d(7, stride=1)
            self.last_linear = nn.Linear(2048, num_classes)

        def _make_layer(self, planes, blocks, reduction, stride):
            downsample = None
            if stride != 1 or self.inplanes != planes * 4:
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride,
                                                     padding=0, bias=False), nn.BatchNorm2d(planes * 4))
            units = [SEResNetBottleneck(self.inplanes, planes, reduction, stride, downsample)]
            self.inplanes = planes * 4
            units += [SEResNetBottleneck(self.inplanes, planes, reduction) for _ in range(1, blocks)]
            return nn.Sequential(*units)

        def features(self, x):
            return self.layer4(self.layer3(self.layer2(self.layer1(self.layer0(x)))))

        def forward(self, x):
            x = self.avg_pool(self.features(x))
            return self.last_linear(x.view(x.size(0), -1))

    torch.manual_seed(0)
    model = SENet()
    with torch.no_grad():  # BatchNorm statistics and affine parameters random, so their mapping is tested
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return torch, model.eval()


@pytest.fixture(scope="module")
def torch_senet(tmp_path_factory):
    torch, model = _torch_senet()
    path = str(tmp_path_factory.mktemp("senet") / "se_resnet50_random.pth")
    torch.save(model.state_dict(), path)
    return torch, model, path


def test_se_resnet50_matches_torch_definition(torch_senet):
    torch, model, path = torch_senet
    size = se_resnet50.MIN_SIZE
    x = np.random.default_rng(4).uniform(-2, 2, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        want_logits = model(xt).numpy()
        want_feats = model.features(xt).mean(dim=(2, 3)).numpy()
    top = pretrained.build("se_resnet50", include_top=True)
    logits = jax.jit(top.apply)(pretrained.load_variables("se_resnet50", path, True, top), x)
    notop = pretrained.build("se_resnet50")
    feats = jax.jit(notop.apply)(pretrained.load_variables("se_resnet50", path, False, notop), x)
    assert np.std(want_feats) > 1e-2 and np.std(want_logits) > 1e-2
    assert _rel_err(feats, want_feats) < TOL
    assert _rel_err(logits, want_logits) < TOL


def test_se_resnet50_counts_and_minimum_size(torch_senet):
    torch, model, _ = torch_senet
    variables, _ = abstract_variables_and_order(pretrained.build("se_resnet50", include_top=True), 224)
    counts = param_counts.variables_counts(variables)
    n_params = sum(p.numel() for p in model.parameters())
    n_stats = sum(b.numel() for k, b in model.state_dict().items() if k.endswith(("running_mean", "running_var")))
    assert counts["trainable"] == n_params == 28_088_024
    assert counts["total"] == n_params + n_stats == 28_141_144
    small = se_resnet50.MIN_SIZE - 1  # the original's AvgPool2d(7) needs a 7x7 map: 194 gives 6x6
    with torch.no_grad(), pytest.raises(RuntimeError):
        model(torch.zeros((1, 3, small, small)))
    with pytest.raises(ValueError, match=f"SE-ResNet50 takes .* at least 195x195, got shape \\(1, {small}"):
        pretrained.build("se_resnet50").init(__import__("jax").random.key(0), np.zeros((1, small, small, 3)))
    with pytest.raises(UserError, match="^SE-ResNet50 takes inputs of at least 195x195, asked for 100; "):
        pretrained.load("se_resnet50", resolution=100)


def test_se_resnet50_preprocessing_is_pretrainedmodels(torch_senet, tmp_path):
    path = torch_senet[2]
    images = np.random.default_rng(5).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    bb = pretrained.load("se_resnet50", path=path)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = (images / 255.0 - mean) / std  # input_space RGB, input_range [0, 1], mean/std of its settings
    np.testing.assert_allclose(np.asarray(bb.preprocess(images)), want, rtol=0, atol=1e-5)


def test_se_resnet50_bad_files(torch_senet, tmp_path):
    torch, model, path = torch_senet
    state = model.state_dict()
    wrong = tmp_path / "resnet_like.pth"
    torch.save(OrderedDict((k.replace("layer0.", "stem."), v) for k, v in state.items()), wrong)
    with pytest.raises(CheckpointError) as e:
        pretrained.load_variables("se_resnet50", str(wrong))
    msg = str(e.value)
    assert "\n" not in msg and "weight layer0.conv1.weight (expected shape (64, 3, 7, 7)) is missing" in msg
    assert "found: stem.conv1.weight, stem.bn1.weight" in msg and "not SE-ResNet50 weights" in msg
    h5 = tmp_path / "keras.h5"
    write_weights(h5, [("conv1_conv", [("kernel", np.zeros((7, 7, 3, 64), np.float32))])])
    with pytest.raises(CheckpointError, match=r"not a PyTorch file.*expected the SE-ResNet50 \.pth state_dict"):
        pretrained.load_variables("se_resnet50", str(h5))
    cut = tmp_path / "cut.pth"
    with open(path, "rb") as f:
        cut.write_bytes(f.read(1_000_000))
    with pytest.raises(CheckpointError, match=r"cut\.pth: .*truncated"):
        pretrained.load_variables("se_resnet50", str(cut))
    damaged = tmp_path / se_resnet50.WEIGHTS[False][0]  # the published name, another content
    damaged.write_bytes(open(path, "rb").read())
    with pytest.raises(CheckpointError, match=r"is damaged or not the published file \(sha256 [0-9a-f]{64}, "
                                              r"expected ce0d4300\)"):
        pretrained.load("se_resnet50", path=str(damaged))


def test_se_resnet50_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    for var, sub in (("LIGHTFLAX_WEIGHTS_DIR", "w"), ("XDG_CACHE_HOME", "xdg"), ("KERAS_HOME", "k")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    with pytest.raises(CheckpointError) as e:
        pretrained.load("se_resnet50")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("SE-ResNet50 weights se_resnet50-ce0d4300.pth not found in ")
    assert f"into {tmp_path / 'w'} or pass --pretrained_path" in msg and "data.lip6.fr" in msg


# ---------------------------------------------------------------- fine-tuning split and registry

def test_xray_transfer_with_a_user_file_and_finetuning(torch_senet, tmp_path):
    """--backbone=se_resnet50 with a user-provided state_dict: features cached, then the last
    residual unit fine-tuned (a block = one unit, counted from the top)."""
    import json

    from conftest import run_launch

    args = ["--experiment=xray_transfer", "--backbone=se_resnet50", f"--pretrained_path={torch_senet[2]}",
            "--dataset=synthetic", "--synthetic_size=8", "--batch_size=8", "--epochs=1", "--finetune_blocks=1",
            "--finetune_epochs=1", f"--feature_cache_dir={tmp_path / 'cache'}", f"--workdir={tmp_path / 'ft'}"]
    run_launch(args, check=0)
    r = json.loads((tmp_path / "ft" / "results.json").read_text())
    s1 = json.loads((tmp_path / "ft" / "head" / "results.json").read_text())
    assert s1["backbone_params"] == 28_141_144 - 2048 * 1000 - 1000 and s1["trainable_params"] == 2048 * 2 + 2
    assert r["finetuned_block_names"] == ["layer4_2"] and r["total_params"] == s1["total_params"]
    unit = 2048 * 512 + 512 * 512 * 9 + 512 * 2048 + 2 * (512 + 512 + 2048) + 2048 * 128 + 128 + 128 * 2048 + 2048
    assert r["trainable_params"] == unit + 2048 * 2 + 2


def test_registry_lists_the_new_backbones():
    assert {"resnet50", "xception", "se_resnet50"} <= set(pretrained.names())
    assert pretrained.known_digest("resnet50") == ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5",
                                                   "4d473c1dd8becc155b73f8504c6f6626")
    assert pretrained.known_digest("xception", True)[2] == "0a58e3b7378bc2990ea3b43d5981f1f6"
