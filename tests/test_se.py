"""Squeeze-and-excitation as a block option of the zoo's models (--se_ratio): parameter counts
against a hand formula, where SE sits in each block, the gate against a NumPy float64 reference
(values) and a plain jnp implementation (gradients), the flag's bad values, and the option's way
through the config into results.json and back (predict, --resume; old runs read as 0)."""

import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import linen as nn

from conftest import REPO, run_launch
from lightflax import checkpoints, models, param_counts
from lightflax.errors import UserError

RUN_V1 = Path(__file__).parent / "data" / "run_v1"
XRAY = [("xray_light", {"k": 5}, 10_141, 9_805), ("xray_conv2d", {}, 31_074, 30_738)]  # SEED_SPEC section 2


def se_params(channels, ratio):
    """SENet's excitation, by hand: Dense(C -> w) + Dense(w -> C) with biases, w = floor(C * ratio)."""
    w = int(channels * ratio)
    return channels * w + w + w * channels + channels


@pytest.mark.parametrize("name,kwargs,total,trainable", XRAY)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_parameter_count_is_the_published_count_plus_the_hand_formula(name, kwargs, total, trainable, ratio):
    extra = sum(se_params(f, ratio) for f in (8, 16, 32))
    assert extra == {0.25: 42 + 148 + 552, 0.5: 76 + 280 + 1_072}[ratio]  # the formula written out per block
    counts = param_counts.param_counts(models.create(name, se_ratio=ratio, **kwargs), (1, 299, 299, 3))
    assert counts == {"total": total + extra, "trainable": trainable + extra, "non_trainable": total - trainable}


@pytest.mark.parametrize("name,kwargs,total,trainable", XRAY)
def test_se_ratio_zero_is_the_published_model(name, kwargs, total, trainable):
    off = models.create(name, se_ratio=0.0, **kwargs)
    counts = param_counts.param_counts(off, (1, 64, 64, 3))
    assert (counts["total"], counts["trainable"]) == (total, trainable)
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    v_off = off.init(jax.random.key(0), x, train=False)
    v_default = models.create(name, **kwargs).init(jax.random.key(0), x, train=False)
    assert jax.tree_util.tree_structure(v_off) == jax.tree_util.tree_structure(v_default)
    np.testing.assert_array_equal(off.apply(v_off, x), models.create(name, **kwargs).apply(v_default, x))


def test_the_summary_lists_each_blocks_squeeze_excite():
    table = param_counts.format_table(models.create("xray_light", k=5, se_ratio=0.25), (1, 28, 28, 3))
    for b, f in enumerate((8, 16, 32)):
        assert f"block{b + 1}_se (SqueezeExcite)" in table and f"{se_params(f, 0.25):,}" in table
    assert "Total params: 10,883" in table


@pytest.mark.parametrize("name,kwargs,shape", [("xray_light", {"k": 2}, (2, 28, 28, 3)),
                                               ("xray_conv2d", {}, (3, 64, 64, 3)),
                                               ("xray_light", {"k": 1}, (1, 299, 299, 3))])
def test_output_shapes(name, kwargs, shape):
    m = models.create(name, se_ratio=0.25, **kwargs)
    out = jax.eval_shape(lambda x: m.init_with_output(jax.random.key(0), x, train=False)[0],
                         jax.ShapeDtypeStruct(shape, jnp.float32))
    assert out.shape == (shape[0], 2)


def _calls(model, x):
    """{module path: (first input, output)} of every module __call__ during one forward pass."""
    seen = {}

    def spy(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path:
            seen.setdefault("/".join(context.module.path), (args[0], out))
        return out

    variables = model.init(jax.random.key(0), x, train=False)
    with nn.intercept_methods(spy):
        model.apply(variables, x, train=False)
    return seen


def test_residual_blocks_excite_the_residual_branch_before_the_addition():
    x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
    seen = _calls(models.create("xray_light", k=2, se_ratio=0.5), x)
    for b in (1, 2, 3):
        se_in, se_out = seen[f"block{b}_se"]
        np.testing.assert_array_equal(se_in, seen[f"block{b}_bn2"][1])  # the branch's last BatchNorm
        shortcut = seen[f"block{b}_bn_shortcut"][1]
        if b < 3:  # the next block's input is MaxPool(ReLU(SE(a) + s)): SE on a only, before the addition
            expected = jax.lax.reduce_window(nn.relu(se_out + shortcut), -jnp.inf, jax.lax.max,
                                             (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            np.testing.assert_allclose(seen[f"block{b + 1}_conv1"][0], expected, rtol=1e-6, atol=1e-6)


def test_plain_blocks_excite_after_the_last_convolution_before_the_pooling():
    x = jax.random.uniform(jax.random.key(3), (2, 64, 64, 3))
    seen = _calls(models.create("xray_conv2d", se_ratio=0.25), x)
    for b in (1, 2):
        se_in, se_out = seen[f"block{b}_se"]
        np.testing.assert_array_equal(se_in, seen[f"block{b}_bn3"][1])  # conv3(relu) -> BN: the block's last
        pooled = jax.lax.reduce_window(se_out, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        np.testing.assert_array_equal(seen[f"block{b + 1}_conv1"][0], pooled)


def _random_se(channels, width, seed):
    rng = np.random.default_rng(seed)
    params = {"reduce_kernel": rng.normal(size=(channels, width)), "reduce_bias": rng.normal(size=width),
              "expand_kernel": rng.normal(size=(width, channels)), "expand_bias": rng.normal(size=channels)}
    x = rng.normal(size=(3, 5, 7, channels)) + rng.normal(size=channels)  # per-channel offsets: varied gates
    return {k: v.astype(np.float32) for k, v in params.items()}, x.astype(np.float32)


def _numpy_gate(p, x):
    p = {k: v.astype(np.float64) for k, v in p.items()}
    s = x.astype(np.float64).mean(axis=(1, 2))
    z = np.maximum(s @ p["reduce_kernel"] + p["reduce_bias"], 0.0)
    return 1.0 / (1.0 + np.exp(-(z @ p["expand_kernel"] + p["expand_bias"])))


def _jnp_se(p, x):
    s = jnp.mean(x, axis=(1, 2))
    z = jnp.maximum(jnp.matmul(s, p["reduce_kernel"], precision="highest") + p["reduce_bias"], 0.0)
    g = 1.0 / (1.0 + jnp.exp(-(jnp.matmul(z, p["expand_kernel"], precision="highest") + p["expand_bias"])))
    return x * g[:, None, None, :]


@pytest.mark.parametrize("channels,width,seed", [(8, 2, 0), (16, 4, 1), (32, 8, 2), (5, 1, 3)])
def test_gate_and_output_equal_the_numpy_reference(channels, width, seed):
    p, x = _random_se(channels, width, seed)
    se = models.SqueezeExcite(width)
    assert jax.tree_util.tree_map(np.shape, se.init(jax.random.key(0), x)["params"]) == \
        {k: v.shape for k, v in p.items()}
    gate = np.asarray(jax.jit(lambda p, x: se.apply({"params": p}, x, method=models.SqueezeExcite.gate))(p, x))
    ref = _numpy_gate(p, x)
    assert gate.shape == (3, channels) and np.all((gate >= 0) & (gate <= 1))
    assert ref.min() < 0.3 and ref.max() > 0.7  # the random case spans the gate's range
    np.testing.assert_allclose(gate, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(se.apply)({"params": p}, x), x * ref[:, None, None, :], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels,width,seed", [(8, 2, 7), (32, 8, 5)])
def test_gradients_equal_a_plain_jnp_implementation(channels, width, seed):
    p, x = _random_se(channels, width, seed)
    pre = x.mean(axis=(1, 2)) @ p["reduce_kernel"] + p["reduce_bias"]
    assert 0 < np.mean(pre > 0) < 1  # both sides of the ReLU: every parameter gets a gradient somewhere
    cot = np.random.default_rng(seed + 10).normal(size=x.shape).astype(np.float32)
    se = models.SqueezeExcite(width)

    def loss_module(p, x):
        return jnp.sum(se.apply({"params": p}, x) * cot)

    def loss_plain(p, x):
        return jnp.sum(_jnp_se(p, x) * cot)

    # under jit (op by op, every primitive of both gradients was compiled on its own)
    got = jax.jit(jax.grad(loss_module, argnums=(0, 1)))(p, x)
    want = jax.jit(jax.grad(loss_plain, argnums=(0, 1)))(p, x)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert np.any(np.asarray(b) != 0)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ratio,match", [(-0.5, "is negative; use 0 .off. or a value from 0.125"),
                                         (0.1, r"zero-width .* smallest valid value is 0.125"),
                                         (0.12, r"floor\(8 x 0.12\) = 0.* smallest valid value is 0.125"),
                                         (1.5, "above 1"), (float("nan"), "must be a number")])
def test_bad_ratios_are_one_line_errors(ratio, match):
    with pytest.raises(UserError, match=match) as e:
        models.create("xray_conv2d", se_ratio=ratio)
    assert "\n" not in str(e.value)


def test_the_smallest_valid_ratio_gives_one_channel():
    m = models.create("xray_light", k=1, se_ratio=0.125)
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)), train=False))
    assert v["params"]["block1_se"]["reduce_kernel"].shape == (8, 1)
    assert models.create("cifar_light", k=1, se_ratio=1 / 16).se_ratio == 1 / 16  # 16 channels: 1/16 is valid
    with pytest.raises(UserError, match="smallest valid value is 0.0625"):
        models.create("cifar_light", k=1, se_ratio=0.06)


@pytest.mark.parametrize("ratio,smallest", [("-0.25", "0.125"), ("0.1", "0.125")])
def test_launch_exits_2_with_one_line(ratio, smallest, tmp_path):
    proc = run_launch(["--experiment=xray_light", f"--se_ratio={ratio}", "--dataset=synthetic", "--epochs=1",
                       f"--workdir={tmp_path / 'w'}"], check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --se_ratio") and smallest in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


def _plan(experiment, argv, tmp_path):
    from ml_collections import config_flags

    from experiments import cli, plan

    fv = flags.FlagValues()
    cli.define(importlib.import_module(f"configs.{experiment}").get_config(), fv)
    argv = ["prog", f"--workdir={tmp_path / 'w'}", "--dataset=synthetic", *argv]
    config_flags.DEFINE_config_file("config", default=str(REPO / "configs" / f"{experiment}.py"), flag_values=fv,
                                    sys_argv=argv)
    fv(argv)
    config, explicit = cli.apply(fv.config, argv[1:], fv)
    cli.check(config)
    return plan.resolve(config, explicit)


def test_the_flag_reaches_every_model_row_and_results_json(tmp_path):
    from lightflax.config import RunConfig

    run = _plan("xray_light", ["--k=5", "--se_ratio=0.25"], tmp_path).rows[0].run
    assert run.model_kwargs == {"k": 5, "se_ratio": 0.25}
    assert RunConfig.from_json(json.loads(json.dumps(run.to_json()))) == run  # results.json round trip
    assert _plan("xray_light", ["--k=5"], tmp_path).rows[0].run.model_kwargs == {"k": 5}  # off: as before
    assert _plan("xray_light", ["--k=5", "--config.model.se_ratio=0.25"], tmp_path).rows[0].run == run
    rows = _plan("xray_compare", ["--ks=1,5", "--se_ratio=0.5", "--transfer_backbone=none"], tmp_path).rows
    assert [(r.label, r.run.model_kwargs.get("se_ratio")) for r in rows] == \
        [("LightLayers K=1 + SE 0.5", 0.5), ("LightLayers K=5 + SE 0.5", 0.5), ("Conv2D + SE 0.5", 0.5)]


def test_a_run_without_the_field_reads_as_off_and_resume_sees_the_difference():
    from lightflax import predict
    from lightflax.config import RunConfig
    from lightflax.train import check_resume_settings

    saved = json.loads((RUN_V1 / "results.json").read_text())["config"]
    assert "se_ratio" not in saved["model_kwargs"]
    module, variables, _, _ = predict.load_replicas(str(RUN_V1))
    assert module.se_ratio == 0 and not any("_se" in k for k in variables[0]["params"])
    old = RunConfig.from_json(saved)
    check_resume_settings(old, saved)
    with pytest.raises(UserError, match="--resume with settings that differ"):
        check_resume_settings(old.replace(model_kwargs=dict(old.model_kwargs, se_ratio=0.25)), saved)


def test_predict_rebuilds_an_se_run_from_results_json(tmp_path):
    from lightflax import predict

    module = models.create("xray_light", k=1, se_ratio=0.25)
    x = jax.random.uniform(jax.random.key(4), (2, 16, 16, 3))
    variables = module.init(jax.random.key(5), x, train=False)
    checkpoints.export_variables(str(tmp_path / "model.msgpack"), variables)
    (tmp_path / "results.json").write_text(json.dumps({
        "num_seeds": 1, "config": {"model": "xray_light", "model_kwargs": {"k": 1, "se_ratio": 0.25},
                                   "image_size": 16, "channels": 3, "mean": None, "eval_image_size": None},
        "dataset": {"num_classes": 2, "stored_shape": [16, 16, 1], "class_names": ["normal", "pneumonia"]}}))
    loaded, got, _, _ = predict.load_replicas(str(tmp_path))
    assert loaded.se_ratio == 0.25
    np.testing.assert_array_equal(loaded.apply(got[0], x), module.apply(variables, x))


@pytest.mark.parametrize("name,kwargs", [("xray_light", {"k": 5}), ("xray_conv2d", {})])
def test_adding_se_leaves_every_other_layers_initialisation_unchanged(name, kwargs):
    """A seed-paired A/B (docs/results.md) compares the same initial weights plus the SE layers."""
    x = jnp.zeros((1, 64, 64, 3))
    off = models.create(name, **kwargs).init(jax.random.key(3), x, train=False)["params"]
    on = models.create(name, se_ratio=0.25, **kwargs).init(jax.random.key(3), x, train=False)["params"]
    assert set(on) - set(off) == {"block1_se", "block2_se", "block3_se"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, off, {k: on[k] for k in off})
