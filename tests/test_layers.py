"""Every layer implementation against a float64 NumPy reference, plus gradients and errors."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lightflax import layers
from lightflax.layers import initializers

RTOL = 1e-5


# ---------------------------------------------------------------------------
# float64 NumPy references, written from the definitions (one output pixel at a time)
# ---------------------------------------------------------------------------


def np_same_pad(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def np_conv(x, w, stride, padding, groups=1):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    kh, kw, cin_g, f = w.shape
    if padding == "SAME":
        pt, pb = np_same_pad(x.shape[1], kh, stride)
        pl, pr = np_same_pad(x.shape[2], kw, stride)
        x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, f))
    fpg = f // groups
    for i in range(ho):
        for j in range(wo):
            win = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            for g in range(groups):
                wg = w[..., g * fpg : (g + 1) * fpg]
                xg = win[..., g * cin_g : (g + 1) * cin_g]
                out[:, i, j, g * fpg : (g + 1) * fpg] = np.tensordot(xg, wg, axes=([1, 2, 3], [0, 1, 2]))
    return out


def np_light_conv(x, p, stride, padding):
    y = np_conv(x, p["w1"], stride, padding) + np.asarray(p["b1"], np.float64)
    y = np.maximum(y, 0)
    return np_conv(y, p["w2"], stride, padding) + np.asarray(p["b2"], np.float64)


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def assert_close(actual, expected, rtol=RTOL):
    chex.assert_equal_shape([np.asarray(actual), np.asarray(expected)])
    err = rel_err(actual, expected)
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


CASES = list(itertools.product(("conv", "einsum"), ("SAME", "VALID"), (1, 2), (1, 3)))
SHAPES = [(1, 7, 7, 3), (7, 8, 10, 2)]  # odd / even sizes, batch 1 / 7


@pytest.mark.parametrize("impl,padding,stride,kernel", CASES)
def test_light_conv2d_matches_numpy(impl, padding, stride, kernel):
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        x = rng.normal(size=shape).astype(np.float32)
        layer = layers.LightConv2D(5, kernel, k=3, strides=stride, padding=padding, impl=impl)
        variables = layer.init(jax.random.key(1), x)
        p = variables["params"]
        chex.assert_shape(p["w1"], (kernel, kernel, shape[-1], 3))
        chex.assert_shape(p["b1"], (3,))
        chex.assert_shape(p["w2"], (kernel, kernel, 3, 5))
        chex.assert_shape(p["b2"], (5,))
        y = jax.jit(layer.apply)(variables, x)
        assert_close(y, np_light_conv(x, p, stride, padding))


@pytest.mark.parametrize("impl,padding,stride,kernel", CASES)
def test_conv2d_matches_numpy(impl, padding, stride, kernel):
    rng = np.random.default_rng(1)
    for shape in SHAPES:
        x = rng.normal(size=shape).astype(np.float32)
        layer = layers.Conv2D(4, kernel, strides=stride, padding=padding, impl=impl)
        variables = layer.init(jax.random.key(2), x)
        p = variables["params"]
        y = layer.apply(variables, x)
        assert_close(y, np_conv(x, p["kernel"], stride, padding) + np.asarray(p["bias"]))


@pytest.mark.parametrize("impl", ["materialize", "factored"])
@pytest.mark.parametrize("padding,stride,kernel", list(itertools.product(("SAME", "VALID"), (1, 2), (1, 3))))
def test_low_rank_conv2d_matches_numpy(impl, padding, stride, kernel):
    rng = np.random.default_rng(2)
    for shape in SHAPES:
        x = rng.normal(size=shape).astype(np.float32)
        layer = layers.LowRankConv2D(6, kernel, k=2, strides=stride, padding=padding, form=impl)
        variables = layer.init(jax.random.key(3), x)
        p = variables["params"]
        p = dict(p, bias=np.random.default_rng(9).normal(size=6).astype(np.float32))
        variables = {"params": p}
        w = np.einsum("hwcr,rf->hwcf", np.asarray(p["u"], np.float64), np.asarray(p["v"], np.float64))
        expected = np_conv(x, w, stride, padding) + p["bias"]
        assert_close(layer.apply(variables, x), expected)


def test_low_rank_materialized_kernel_is_one_convolution():
    x = np.random.default_rng(3).normal(size=(2, 9, 9, 4)).astype(np.float32)
    layer = layers.LowRankConv2D(8, 3, k=2)
    variables = layer.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(layer.apply)(variables, x)
    n_conv = str(jaxpr).count("conv_general_dilated")
    assert n_conv == 1, f"materialised low-rank conv ran {n_conv} convolutions"
    chex.assert_shape(variables["params"]["u"], (3, 3, 4, 2))
    chex.assert_shape(variables["params"]["v"], (2, 8))


@pytest.mark.parametrize("padding,stride,kernel,taps",
                         list(itertools.product(("SAME", "VALID"), (1, 2), (1, 3), (True, False))))
def test_separable_conv2d_matches_numpy(padding, stride, kernel, taps):
    rng = np.random.default_rng(4)
    for shape in SHAPES:
        x = rng.normal(size=shape).astype(np.float32)
        layer = layers.SeparableConv2D(5, kernel, strides=stride, padding=padding, depthwise_taps=taps)
        variables = layer.init(jax.random.key(4), x)
        p = variables["params"]
        c = shape[-1]
        chex.assert_shape(p["depthwise_kernel"], (kernel, kernel, c, 1))
        chex.assert_shape(p["pointwise_kernel"], (1, 1, c, 5))
        dw = np.asarray(p["depthwise_kernel"]).reshape(kernel, kernel, 1, c)
        y = np_conv(x, dw, stride, padding, groups=c)
        y = np_conv(y, p["pointwise_kernel"], 1, "VALID") + np.asarray(p["bias"])
        assert_close(layer.apply(variables, x), y)


@pytest.mark.parametrize("batch", [1, 7])
def test_light_dense_matches_numpy(batch):
    x = np.random.default_rng(5).normal(size=(batch, 32)).astype(np.float32)
    layer = layers.LightDense(10, k=8)
    variables = layer.init(jax.random.key(5), x)
    p = variables["params"]
    chex.assert_shape(p["w1"], (32, 8))
    chex.assert_shape(p["w2"], (8, 10))
    chex.assert_shape(p["bias"], (10,))
    s = np.sqrt(2.0 / 10)
    p64 = {k: np.asarray(v, np.float64) for k, v in p.items()}
    p64["bias"] = p64["bias"] + 0.3  # a non-zero bias exercises the addition
    expected = (x.astype(np.float64) @ (p64["w1"] * s)) @ (p64["w2"] * s) + p64["bias"]
    assert_close(layer.apply({"params": {**p, "bias": p64["bias"].astype(np.float32)}}, x), expected)


@pytest.mark.parametrize("shape", [(), (7, 3), (4097,), (3, 3, 32, 5)])
def test_uniform_is_jax_random_uniform_bit_for_bit(shape):
    """layers.uniform draws a power-of-two bucket and slices it: the same bits as
    jax.random.uniform for the shape itself, raw and typed keys, and under vmap (--num_seeds)."""
    for key in (jax.random.PRNGKey(3), jax.random.key(3), jax.random.fold_in(jax.random.key(5), 7)):
        np.testing.assert_array_equal(layers.uniform(key, shape, jnp.float32, -0.3, 0.7),
                                      jax.random.uniform(key, shape, jnp.float32, -0.3, 0.7))
    keys = jax.random.split(jax.random.key(1), 3)
    np.testing.assert_array_equal(jax.vmap(lambda k: layers.glorot_uniform(k, shape))(keys),
                                  jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, *_limits(shape)))(keys))
    assert layers.uniform(jax.random.key(0), (0, 3), jnp.float32, 0.0, 1.0).shape == (0, 3)


def _limits(shape):
    fan_in, fan_out = initializers._keras_fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return -limit, limit


def test_light_conv2d_reference_initialisation():
    """Kernels glorot-uniform; biases glorot-uniform too (the reference's initializer=None)."""
    layer = layers.LightConv2D(64, 3, k=16)
    p = layer.init(jax.random.key(0), jnp.zeros((1, 8, 8, 32)))["params"]
    limit_w1 = np.sqrt(6.0 / (3 * 3 * 32 + 3 * 3 * 16))
    assert np.abs(p["w1"]).max() <= limit_w1
    assert np.abs(p["w1"]).max() > 0.9 * limit_w1
    assert np.abs(p["b2"]).max() <= np.sqrt(6.0 / 128) and np.abs(p["b2"]).max() > 0.05
    zeros = layers.LightConv2D(64, 3, k=16, bias_init="zeros").init(jax.random.key(0), jnp.zeros((1, 8, 8, 32)))
    assert not np.any(zeros["params"]["b1"]) and not np.any(zeros["params"]["b2"])


@pytest.mark.parametrize("impl", ["conv", "einsum"])
def test_light_conv2d_gradients(impl):
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        x = jnp.asarray(rng.normal(size=(2, 5, 6, 2)))
        layer = layers.LightConv2D(3, 3, k=2, strides=1, impl=impl)
        params = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64), layer.init(jax.random.key(0), x)["params"]
        )
        f = jax.jit(lambda p, x: jnp.sum(jnp.tanh(layer.apply({"params": p}, x))))  # jit: not op by op
        check_grads(f, (params, x), order=1, modes=("rev",), atol=1e-5, rtol=1e-5, eps=1e-6)


@pytest.mark.parametrize("impl", ["conv", "einsum"])
def test_light_conv2d_impls_have_equal_gradients(impl):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(3, 9, 8, 3)), jnp.float32)
    ref = layers.LightConv2D(4, 3, k=2, strides=2, impl="conv")
    params = ref.init(jax.random.key(0), x)["params"]
    layer = layers.LightConv2D(4, 3, k=2, strides=2, impl=impl)
    loss = lambda m: (lambda p, x: jnp.sum(m.apply({"params": p}, x) ** 2))
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    g = jax.jit(jax.grad(loss(layer), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        assert rel_err(a, b) < 1e-5


def test_other_layers_gradients():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 6, 5, 3)))
        for layer in (
            layers.LowRankConv2D(4, 3, k=2),
            layers.LowRankConv2D(4, 3, k=2, form="factored"),
            layers.SeparableConv2D(4, 3, strides=2),
        ):
            params = jax.tree_util.tree_map(
                lambda a: jnp.asarray(a, jnp.float64), layer.init(jax.random.key(0), x)["params"]
            )
            f = jax.jit(lambda p, x, layer=layer: jnp.sum(jnp.sin(layer.apply({"params": p}, x))))  # not op by op
            check_grads(f, (params, x), order=1, modes=("rev",), atol=1e-5, rtol=1e-5, eps=1e-6)
        dense = layers.LightDense(4, k=3)
        xd = x.reshape(2, -1)
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), dense.init(jax.random.key(0), xd)["params"])
        check_grads(jax.jit(lambda p, x: jnp.sum(jnp.sin(dense.apply({"params": p}, x)))), (params, xd), order=1,
                    modes=("rev",), atol=1e-5, rtol=1e-5, eps=1e-6)


def test_reference_l2_penalty_covers_light_conv_kernels_only():
    params = {
        "a": {"w1": jnp.ones((3, 3, 2, 1)), "w2": jnp.ones((3, 3, 1, 4)), "b1": jnp.ones((1,))},
        "head": {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 2))},
    }
    np.testing.assert_allclose(layers.reference_l2_penalty(params, 1e-4), 1e-4 * (18 + 36), rtol=1e-6)


# ---------------------------------------------------------------------------
# Bad input: one-line ValueError naming the argument
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: layers.LightConv2D(8, 3, k=0), "k must be an integer >= 1"),
        (lambda: layers.LightConv2D(0, 3, k=2), "features must be an integer >= 1"),
        (lambda: layers.LightConv2D(8, 3, k=2, padding="FULL"), "padding must be"),
        (lambda: layers.LightConv2D(8, 3, k=2, impl="cuda"), "impl must be one of"),
        (lambda: layers.LightConv2D(8, (3, 0), k=2), "kernel_size must be >= 1"),
        (lambda: layers.LightDense(10, k=0), "k must be an integer >= 1"),
        (lambda: layers.LowRankConv2D(8, 3, k=0), "k must be an integer >= 1"),
        (lambda: layers.LowRankConv2D(8, 3, k=2, form="svd"), "form must be 'materialize' or 'factored'"),
        (lambda: layers.Conv2D(-1, 3), "features must be an integer >= 1"),
    ],
)
def test_bad_arguments_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_raise_clear_errors():
    layer = layers.LightConv2D(8, 3, k=2, padding="VALID")
    with pytest.raises(ValueError, match=r"kernel_size 3x3 is larger than the input 2x2 under padding='VALID'"):
        layer.init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="expects NHWC input of rank 4, got rank 3"):
        layer.init(jax.random.key(0), jnp.zeros((2, 8, 3)))
    variables = layer.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="initialised for 3 input channels but got 1"):
        layer.apply(variables, jnp.zeros((1, 8, 8, 1)))
    dense = layers.LightDense(4)
    dv = dense.init(jax.random.key(0), jnp.zeros((1, 6)))
    with pytest.raises(ValueError, match="initialised for 6 input features but got 5"):
        dense.apply(dv, jnp.zeros((1, 5)))


@pytest.mark.parametrize("padding,stride,kernel", list(itertools.product(("SAME", "VALID"), (1, 2), (2, 3, 5))))
def test_depthwise_taps_equals_grouped_conv_with_gradients(padding, stride, kernel):
    """The fused shifted-slice depthwise convolution (SeparableConv2D's default) against
    the grouped lax.conv, values and both gradients, on odd and even sizes."""
    rng = np.random.default_rng(11)
    for shape in ((3, 9, 9, 4), (2, 8, 11, 6)):
        x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
        w = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1])).astype(np.float32))
        g = jnp.asarray(rng.normal(size=layers.depthwise_conv2d(x, w, (stride, stride), padding).shape),
                        jnp.float32)

        # under jit (op by op, a 5x5 kernel's 25 shifted slices and their gradients compiled one at a time
        # took most of this test's time)
        @functools.partial(jax.jit, static_argnums=2)
        def value_and_grads(w, x, taps):
            def f(w, x):
                return layers.depthwise_conv2d(x, w, (stride, stride), padding, taps=taps)

            y, vjp = jax.vjp(f, w, x)
            return y, vjp(g)

        (y_t, grads_t), (y_c, grads_c) = value_and_grads(w, x, True), value_and_grads(w, x, False)
        assert rel_err(y_t, y_c) < 1e-5
        for a, b in zip(grads_t, grads_c):
            assert rel_err(a, b) < 1e-5
