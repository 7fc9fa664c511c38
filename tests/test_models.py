"""The model zoo: parameter parity with every published row, shapes, errors, jit and grad."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightflax import models, param_counts

# (model, kwargs, input NHWC, total, trainable) — SEED_SPEC section 2 and Tables 1, 2, 4.
PUBLISHED = [
    # the seed study's rows (trainable = total - 336 BN moving statistics)
    ("xray_light", {"k": 1}, (1, 299, 299, 3), 2_753, 2_417),
    ("xray_light", {"k": 2}, (1, 299, 299, 3), 4_600, 4_264),
    ("xray_light", {"k": 3}, (1, 299, 299, 3), 6_447, 6_111),
    ("xray_light", {"k": 4}, (1, 299, 299, 3), 8_294, 7_958),
    ("xray_light", {"k": 5}, (1, 299, 299, 3), 10_141, 9_805),
    ("xray_conv2d", {}, (1, 299, 299, 3), 31_074, 30_738),
    # Table 1 (MNIST) and Table 2 (Fashion-MNIST): same architectures
    ("mnist_conv2d", {}, (1, 28, 28, 1), 18_818, None),
    ("mnist_separable", {}, (1, 28, 28, 1), 3_611, None),
    ("mnist_light", {"k": 1}, (1, 28, 28, 1), 2_649, None),
    ("mnist_light", {"k": 2}, (1, 28, 28, 1), 4_392, None),
    ("mnist_light", {"k": 3}, (1, 28, 28, 1), 6_135, None),
    ("mnist_light", {"k": 4}, (1, 28, 28, 1), 7_878, None),
    ("mnist_light", {"k": 5}, (1, 28, 28, 1), 9_621, None),
    ("mnist_light", {"k": 6}, (1, 28, 28, 1), 11_364, None),
    # Table 4 (CIFAR-100)
    ("cifar_conv2d", {"num_classes": 100}, (1, 32, 32, 3), 82_644, None),
    ("cifar_separable", {"num_classes": 100}, (1, 32, 32, 3), 20_290, None),
    ("cifar_light", {"k": 1, "num_classes": 100}, (1, 32, 32, 3), 6_747, None),
    ("cifar_light", {"k": 2, "num_classes": 100}, (1, 32, 32, 3), 10_402, None),
    ("cifar_light", {"k": 3, "num_classes": 100}, (1, 32, 32, 3), 14_057, None),
    ("cifar_light", {"k": 4, "num_classes": 100}, (1, 32, 32, 3), 17_712, None),
    ("cifar_light", {"k": 5, "num_classes": 100}, (1, 32, 32, 3), 21_367, None),
]


@pytest.mark.parametrize("name,kwargs,shape,total,trainable", PUBLISHED)
def test_parameter_counts_match_published_tables(name, kwargs, shape, total, trainable):
    model = models.create(name, **kwargs)
    counts = param_counts.param_counts(model, shape)
    assert counts["total"] == total
    if trainable is not None:
        assert counts["trainable"] == trainable
    # the non-trainable variables are exactly BatchNorm's moving mean and variance: 2 per channel of
    # every BatchNorm layer (channels read from the layers' output shapes, not from the variables)
    bn_channels = {path: out[-1] for path, kind, out, _ in param_counts.layer_table(model, shape) if kind == "BatchNorm"}
    assert bn_channels and counts["non_trainable"] == 2 * sum(bn_channels.values())


def test_parameter_counts_do_not_depend_on_input_size():
    m = models.create("xray_light", k=5)
    assert param_counts.param_counts(m, (2, 64, 48, 3)) == param_counts.param_counts(m, (1, 299, 299, 3))


def test_registry_lists_required_models():
    required = {"xray_light", "xray_conv2d", "mnist_conv2d", "mnist_separable", "mnist_light",
                "cifar_conv2d", "cifar_separable", "cifar_light"}
    assert required <= set(models.names())
    assert models.names() == sorted(models.names())


@pytest.mark.parametrize("k", [1, 7, 32])
def test_xray_light_any_k(k):
    counts = param_counts.param_counts(models.create("xray_light", k=k), (1, 64, 64, 3))
    assert counts["total"] == 2_753 + (k - 1) * (4_600 - 2_753)  # linear in k


OUTPUT_SHAPES = [
    ("xray_light", {"k": 5}, (1, 299, 299, 3)),
    ("xray_conv2d", {}, (1, 299, 299, 3)),
    ("xray_light", {"k": 2}, (2, 128, 96, 3)),
    ("xray_conv2d", {}, (3, 128, 128, 3)),
    ("xray_lowrank", {"k": 3}, (2, 33, 33, 3)),
    ("mnist_conv2d", {}, (3, 28, 28, 1)),
    ("mnist_separable", {}, (2, 28, 28, 1)),
    ("mnist_light", {"k": 2}, (2, 28, 28, 1)),
    ("mnist_light", {"k": 2}, (2, 64, 64, 1)),
    ("cifar_conv2d", {"num_classes": 10}, (2, 32, 32, 3)),
    ("cifar_separable", {"num_classes": 100}, (2, 32, 32, 3)),
    ("cifar_light", {"k": 3, "num_classes": 100}, (2, 40, 40, 3)),
]


@pytest.mark.parametrize("name,kwargs,shape", OUTPUT_SHAPES)
def test_output_shapes(name, kwargs, shape):
    model = models.create(name, **kwargs)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    chex.assert_shape(out, (shape[0], kwargs.get("num_classes", models.info(name).num_classes)))


def test_xray_intermediate_shapes_at_299():
    rows = {r[0]: r[2] for r in param_counts.layer_table(models.create("xray_conv2d"), (1, 299, 299, 3))}
    assert rows["block1_conv1"] == (1, 297, 297, 8)
    assert rows["block1_conv3"] == (1, 293, 293, 8)
    assert rows["block2_conv1"] == (1, 144, 144, 16)
    assert rows["block3_conv3"] == (1, 64, 64, 32)
    rows = {r[0]: r[2] for r in param_counts.layer_table(models.create("xray_light", k=5), (1, 299, 299, 3))}
    assert rows["block1_conv1"] == (1, 299, 299, 8)
    assert rows["block2_shortcut"] == (1, 149, 149, 16)
    assert rows["block3_conv2"] == (1, 74, 74, 32)
    assert rows["head"] == (1, 2)


def test_train_step_jit_and_grad_update_batch_stats():
    model = models.create("xray_light", k=2)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 32, 32, 3)), jnp.float32)
    y = jnp.array([0, 1, 1, 0])
    variables = model.init(jax.random.key(0), x, train=False)

    @jax.jit
    def step(params, batch_stats):
        def loss_fn(p):
            logits, new_state = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                            mutable=["batch_stats"])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), new_state
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, new_state["batch_stats"]

    loss, grads, new_stats = step(variables["params"], variables["batch_stats"])
    assert np.isfinite(loss)
    chex.assert_trees_all_equal_shapes(grads, variables["params"])
    assert all(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads))
    old_mean = variables["batch_stats"]["block1_bn1"]["mean"]
    assert not np.allclose(new_stats["block1_bn1"]["mean"], old_mean)


def test_batchnorm_uses_keras_defaults():
    v = models.create("mnist_conv2d").init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False)
    bn = v["batch_stats"]["block1_bn1"]
    np.testing.assert_array_equal(bn["mean"], 0.0)
    np.testing.assert_array_equal(bn["var"], 1.0)
    from lightflax import layers
    m = layers.BatchNorm(train=True)
    assert m.momentum == 0.99 and m.epsilon == 1e-3


def test_impls_agree_on_a_whole_model():
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 24, 24, 3)), jnp.float32)
    ref = models.create("xray_light", k=3, impl="conv")
    variables = ref.init(jax.random.key(0), x, train=False)
    y_ref = ref.apply(variables, x, train=False)
    y = models.create("xray_light", k=3, impl="einsum").apply(variables, x, train=False)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: models.create("xray_light", k=0), "k must be an integer >= 1"),
        (lambda: models.create("xray_light"), "needs k"),
        (lambda: models.create("xray_conv2d", k=3), "does not take k"),
        (lambda: models.create("cifar_light", k=2, num_classes=0), "num_classes must be an integer >= 1"),
        (lambda: models.create("resnet50"), "unknown model 'resnet50'; available: "),
    ],
)
def test_bad_model_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_too_small_or_wrong_inputs_raise_one_line_errors():
    model = models.create("xray_conv2d")
    with pytest.raises(ValueError, match=r"xray_conv2d needs inputs of at least 50x50 pixels, got 16x16"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    with pytest.raises(ValueError, match=r"needs inputs of at least 8x8 pixels, got 7x7"):
        models.create("xray_light", k=1).init(jax.random.key(0), jnp.zeros((1, 7, 7, 3)), train=False)
    with pytest.raises(ValueError, match="expects NHWC images of rank 4, got rank 3"):
        model.init(jax.random.key(0), jnp.zeros((16, 16, 3)), train=False)
    m3 = models.create("mnist_conv2d", in_channels=1)
    with pytest.raises(ValueError, match="expects 1 input channel"):
        m3.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)), train=False)
    v = models.create("mnist_conv2d").init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
    with pytest.raises(ValueError, match="initialised for 1 input channels but got 3"):
        models.create("mnist_conv2d").apply(v, jnp.zeros((1, 28, 28, 3)), train=False)


def test_summary_cli_prints_keras_table(capsys):
    assert param_counts.main(["--model=xray_light", "--k=5"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 10,141" in out and "Trainable params: 9,805" in out
    assert "block1_conv1 (LightConv2D)" in out
    assert param_counts.main(["--model=nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
