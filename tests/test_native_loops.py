"""The hand-written native loops (lightflax/native/csrc/loops.h: BatchNorm, 2x2 max pooling, the
convolution backward's ReLU mask and bias gradient) on EVERY instruction set the CPU has (baseline
x86-64 and AVX2 + FMA, forced through ``lightflax_native_set_isa``), against float64 NumPy (values
and gradients within 1e-5 relative) and lightflax.native.xla_pool (pooling: exactly, ties and NaN windows
included), on random inputs: odd sizes, channel counts the loops are and are not compiled for, a
mean large against the spread (the one-pass variance), a constant channel, leading (vmapped) dims.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from lightflax import layers, native
from lightflax.native import xla_pool
from lightflax.native import ops

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native library not loaded: {native.status()['reason']}")
EPS = 1e-3


def _isas():
    if not native.available():
        return [0]
    lib = native._LIB.lib
    have = [i for i in (0, 1) if int(lib.lightflax_native_set_isa(i)) == i]
    lib.lightflax_native_set_isa(-1)
    return have


@pytest.fixture(params=_isas(), ids=lambda i: ("base", "avx2")[i])
def isa(request):
    lib = native._LIB.lib
    assert int(lib.lightflax_native_set_isa(request.param)) == request.param
    with native.kernels("native"):
        yield request.param
    lib.lightflax_native_set_isa(-1)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _bn_xla(x, scale, bias):  # the off-CPU branch (never run here)
    mean = jnp.mean(x, axis=(-4, -3, -2))
    var = jnp.var(x, axis=(-4, -3, -2))
    return (x - mean) * lax.rsqrt(var + EPS) * scale + bias, mean, var


def _bn_ref(X, G, S, B, relu):
    """float64: y, mean, var and (for the cotangent G of y) dx, dscale, dbias, per leading replica."""
    ax = (-4, -3, -2)
    mu, var = X.mean(ax, keepdims=True), X.var(ax, keepdims=True)
    inv = 1 / np.sqrt(var + np.float64(np.float32(EPS)))
    xh = (X - mu) * inv
    S, B = S[..., None, None, None, :], B[..., None, None, None, :]
    pre = xh * S + B
    gg = G * (pre > 0) if relu else G
    dx = S * inv * (gg - gg.mean(ax, keepdims=True) - xh * (gg * xh).mean(ax, keepdims=True))
    return dict(y=np.maximum(pre, 0) if relu else pre, mean=mu[..., 0, 0, 0, :], var=var[..., 0, 0, 0, :], dx=dx,
                dscale=(gg * xh).sum(ax), dbias=gg.sum(ax))


# (leading dims, per-replica shape): channel counts with (8, 16, 32, 64) and without (3, 5, 12, 24) compiled
# loops; several chunks of rows (65 x 67, 4 x 33 x 35); one row per image.
BN_CASES = [((), (2, 5, 7, 3)), ((), (3, 4, 4, 8)), ((), (2, 3, 5, 12)), ((), (1, 7, 3, 16)), ((), (2, 6, 6, 24)),
            ((), (2, 3, 3, 32)), ((), (1, 5, 5, 64)), ((), (1, 65, 67, 8)), ((), (4, 33, 35, 16)), ((), (2, 1, 1, 5)),
            ((2,), (2, 5, 7, 3)), ((2,), (3, 4, 4, 8)), ((3,), (1, 9, 7, 32))]


@needs_native
@pytest.mark.parametrize("lead,shape", BN_CASES, ids=lambda v: "x".join(map(str, v)) or "-")
@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_loops_match_float64(isa, lead, shape, relu):
    rng = np.random.default_rng(sum(shape) + 7 * relu + len(lead))
    full = (*lead, *shape)
    c = shape[-1]
    # a mean 100x the spread (the one-pass variance must not cancel), an outlier in the first row (the
    # shift is a sample mean, not x[0]), a constant channel (mean == its value, var == 0, y == bias)
    x = 50.0 + 0.5 * rng.standard_normal(full)
    x[..., 0, 0, 0, :] += 15.0
    if c > 1:
        x[..., 1] = 0.3
    x = x.astype(np.float32)
    g = rng.standard_normal(full).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal((*lead, c))).astype(np.float32)
    bias = (0.1 * rng.standard_normal((*lead, c))).astype(np.float32)

    def f(x, s, b):
        return ops.batch_norm_train(x, s, b, EPS, relu, None, _bn_xla)

    fn = f
    for _ in lead:
        fn = jax.vmap(fn)
    (y, mean, var), vjp = jax.vjp(jax.jit(fn), x, scale, bias)
    dx, dscale, dbias = vjp((jnp.asarray(g), jnp.zeros_like(mean), jnp.zeros_like(var)))
    want = _bn_ref(x.astype(np.float64), g.astype(np.float64), scale.astype(np.float64), bias.astype(np.float64),
                   relu)
    got = dict(y=y, mean=mean, var=var, dx=dx, dscale=dscale, dbias=dbias)
    for k, ref in want.items():
        e = rel_err(got[k], ref)
        assert e <= (1e-6 if k == "mean" else 1e-5), (k, e)
    if c > 1:
        assert np.all(np.asarray(mean)[..., 1] == np.float32(0.3)) and np.all(np.asarray(var)[..., 1] == 0)
        y1 = np.asarray(y)[..., 1]
        b1 = bias[..., 1][(...,) + (None,) * 3]
        assert np.all(y1 == (np.maximum(b1, 0) if relu else b1))


@needs_native
def test_batchnorm_isas_agree():
    """Both instruction sets: the same statistics within float reassociation/contraction (1e-6)."""
    isas = _isas()
    if len(isas) < 2:
        pytest.skip("the CPU has no AVX2: one instruction set only")
    rng = np.random.default_rng(3)
    x = (2.0 + rng.standard_normal((4, 17, 19, 16))).astype(np.float32)
    s, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    fn = jax.jit(lambda x: ops.batch_norm_train(x, s, b, EPS, True, None, _bn_xla))
    lib, outs = native._LIB.lib, []
    try:
        for i in isas:
            lib.lightflax_native_set_isa(i)
            outs.append([np.asarray(a) for a in fn(x)])
    finally:
        lib.lightflax_native_set_isa(-1)
    for a, e in zip(outs[0], outs[1]):
        assert rel_err(a, e) <= 1e-6


POOL_SHAPES = [(1, 4, 6, 3), (7, 5, 7, 2), (2, 9, 8, 5), (3, 2, 3, 1), (2, 16, 16, 32), (2, 7, 9, 8), (1, 5, 11, 16),
               (2, 6, 4, 64), (1, 3, 5, 12), (1, 1, 4, 8), (2, 4, 1, 8)]


def _pool_ref(x, g):
    """NumPy: 2x2 max pooling (NaN when the window has one) and its gradient to the first maximal element
    of each window (row-major; none in a NaN window); the odd last row/column get 0."""
    n, h, w, c = x.shape
    win = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    win = win.reshape(n, h // 2, w // 2, 4, c)
    m = win.max(3)  # NumPy's max propagates NaN
    first = np.argmax(win == m[:, :, :, None], axis=3)
    hit = (np.arange(4)[None, None, None, :, None] == first[:, :, :, None]) & ~np.isnan(m)[:, :, :, None]
    d = np.where(hit, g[:, :, :, None], 0.0).astype(np.float32)
    dx = np.zeros(x.shape, np.float32)
    dx[:, : h // 2 * 2, : w // 2 * 2] = d.reshape(n, h // 2, w // 2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        n, h // 2 * 2, w // 2 * 2, c)
    return m, dx


@needs_native
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_max_pool_loops_exact(isa, shape):
    """Exact values and gradients. Without NaN: equal to lightflax.native.xla_pool (XLA); with NaN windows: to
    NumPy (XLA:CPU's vectorised max drops a NaN in some shapes, jnp.max's documented result keeps it)."""
    rng = np.random.default_rng(sum(shape))
    x = np.round(2 * rng.standard_normal(shape)).astype(np.float32)  # many ties
    g = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32)
    nat = lambda x: native.max_pool_2x2(x, xla_pool.max_pool_2x2)  # noqa: E731
    y, vjp = jax.vjp(jax.jit(nat), x)
    want_y, want_vjp = jax.vjp(jax.jit(xla_pool.max_pool_2x2), x)  # jit: not op by op
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(vjp(g)[0], want_vjp(g)[0])
    xs, gs = np.stack([x, -x]), np.stack([g, 2 * g])  # leading (vmapped) dims
    ys, vjps = jax.vjp(jax.jit(jax.vmap(nat)), xs)
    wys, wvjps = jax.vjp(jax.jit(jax.vmap(xla_pool.max_pool_2x2)), xs)
    np.testing.assert_array_equal(ys, wys)
    np.testing.assert_array_equal(vjps(gs)[0], wvjps(gs)[0])
    if x.size > 8:
        x.reshape(-1)[rng.choice(x.size, 3, replace=False)] = np.nan
    y, vjp = jax.vjp(jax.jit(nat), x)
    want_y, want_dx = _pool_ref(x, g)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(vjp(g)[0], want_dx)


@needs_native
@pytest.mark.parametrize("o", [8, 12, 16, 32, 5])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_backward_mask_and_bias_gradient(isa, o, relu):
    """The convolution backward's ReLU mask and bias gradient (the loops' MaskSums) against float64."""
    rng = np.random.default_rng(o + relu)
    x = rng.standard_normal((3, 9, 7, 4)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 4, o)) / 6).astype(np.float32)
    b = (0.1 * rng.standard_normal(o)).astype(np.float32)
    strides, pads = (1, 1), ((1, 1), (1, 1))

    def nat(x, w, b):
        return native.conv2d(x, w, b, strides, pads, nn.relu if relu else None,
                             lambda x, w: layers.lax_conv2d(x, w, strides, "SAME"))

    def ref(x, w, b):
        y = lax.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
        return nn.relu(y) if relu else y

    y, vjp = jax.vjp(jax.jit(nat), x, w, b)
    g = rng.standard_normal(y.shape).astype(np.float32)
    got = vjp(g)
    want = jax.vjp(jax.jit(ref), x, w, b)[1](g)
    for a, e in zip(got, want):
        assert rel_err(a, e) <= 1e-5
    yy = np.asarray(y, np.float64)
    gg = g.astype(np.float64) * (yy > 0) if relu else g.astype(np.float64)
    assert rel_err(got[2], gg.sum((0, 1, 2))) <= 1e-5
