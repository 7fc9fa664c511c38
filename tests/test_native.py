"""lightflax.native: the oneDNN / C++ kernels through XLA FFI against lax and flax references.

Native-only tests are skipped (with the reason) when the library is not built; CI builds it
(pip install builds it against the oneDNN wheels). The fallback tests run everywhere.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from conftest import REPO, run_python
from lightflax import layers, native
from lightflax.errors import UserError
from lightflax.native import _loader, xla_pool

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native library not loaded: {native.status()['reason']}")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_close(a, b, tol=1e-5):
    assert np.shape(a) == np.shape(b)
    assert rel_err(a, b) <= tol, rel_err(a, b)


# ---------------------------------------------------------------------------
# The switch, the status and the fallback (run with or without the library)
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _native_kernels():
    """The per-kernel tests below trace with the native kernels (the default where the library is loaded)."""
    with native.kernels("native"):
        yield


def test_status_and_switch():
    s = native.status()
    assert set(s) >= {"kernels", "reason", "library", "onednn", "threads"}
    assert s["kernels"] in native.KERNELS and s["reason"]
    with native.kernels("xla"):
        assert not native.active() and native.status()["kernels"] == "xla"
        assert "requested" in native.status()["reason"] or not native.available()
    assert native.status() == s
    with pytest.raises(UserError, match="kernels must be one of native, xla"):
        native.set_kernels("onednn")
    with pytest.raises(UserError, match="integer >= 1"):
        native.set_threads(0)


def test_thread_policy_shares_the_cpus_among_cpu_devices(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    flags = "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"
    assert native._configured_cpu_devices(num_cpu_devices=-1, xla_flags=flags) == 8
    assert native._configured_cpu_devices(num_cpu_devices=4, xla_flags=flags) == 4
    assert native._configured_cpu_devices(num_cpu_devices=-1, xla_flags="") == 1
    devices = native._configured_cpu_devices()
    assert native.auto_threads() == max(1, cpus // devices)
    if not native.available():
        pytest.skip(f"native library not loaded: {native.status()['reason']}")
    before = native.threads()
    monkeypatch.setitem(native._threads_policy, "auto", True)  # restored after the test
    try:
        assert native.active() and native.threads() == max(1, cpus // devices)  # resolved when traced
        native.set_threads(1)  # an explicit choice replaces the automatic one
        assert native.threads() == 1 and not native._threads_policy["auto"]
    finally:
        native._LIB.lib.lightflax_native_set_threads(before)


def test_call_times_count_the_time_inside_handlers():
    if not native.available():
        pytest.skip(f"native library not loaded: {native.status()['reason']}")
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
    native.reset_call_counts()
    jax.block_until_ready(jax.jit(lambda x: native.max_pool_2x2(x, None))(x))
    times = native.call_times()
    assert native.call_counts()["pool_fwd"] == 1 and times["pool_fwd"] > 0
    assert all(t == 0 for k, t in times.items() if k != "pool_fwd")
    native.reset_call_counts()
    assert sum(native.call_times().values()) == 0


def test_counter_names_come_from_the_library():
    if not native.available():
        pytest.skip(f"native library not loaded: {native.status()['reason']}")
    names = native._LIB.counter_names
    assert len(names) == len(set(names)) and {"conv_fwd", "conv_bwd", "bn_fwd", "pool_bwd", "dwconv_bwd"} <= set(names)
    assert tuple(native.call_counts()) == names == tuple(native.call_times())
    # index i of the library's counters is name i: one counted call lands under its own name only
    x = jax.random.normal(jax.random.key(1), (1, 4, 4, 8))
    native.reset_call_counts()
    jax.block_until_ready(jax.jit(lambda x: native.max_pool_2x2(x, None))(x))
    assert {k for k, n in native.call_counts().items() if n} == {"pool_fwd"}
    assert native._LIB.lib.lightflax_native_calls(len(names)) == -1


def _import_with_lib(path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_loader.ENV_LIB: str(path)})
    code = "import lightflax.layers, lightflax.native as n; print(n.status()['kernels'])"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("kind", ["missing", "not_a_library", "missing_symbol"])
def test_broken_library_warns_once_and_falls_back(tmp_path, kind):
    if kind == "missing":
        path, problem = tmp_path / "nope.so", "cannot load nope.so"
    elif kind == "not_a_library":
        path, problem = tmp_path / "bogus.so", "cannot load bogus.so"
        path.write_text("not an ELF file")
    else:  # a real shared library without lightflax's symbols
        import ctypes.util

        path, problem = ctypes.util.find_library("m"), "lacks a symbol"
        assert path
    proc = _import_with_lib(path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "xla"
    lines = [ln for ln in proc.stderr.splitlines() if "lightflax" in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lightflax: native kernels disabled: ") and problem in lines[0]
    assert lines[0].endswith("falling back to XLA's kernels")
    assert "Traceback" not in proc.stderr


_NO_ONEDNN_WHEEL = """
import ctypes, importlib.metadata as m
try:
    ctypes.CDLL("libdnnl.so.3")  # resolvable without the wheel (LD_LIBRARY_PATH, /usr/lib): nothing to test
    print("system-onednn"); raise SystemExit(0)
except OSError:
    pass
real = m.distribution
def distribution(name):  # the runtime wheel uninstalled
    if name == "onednn-cpu-gomp":
        raise m.PackageNotFoundError(name)
    return real(name)
m.distribution = distribution
import lightflax.layers, lightflax.native as n
print(n.status()["kernels"])
"""


@needs_native
def test_missing_onednn_runtime_wheel_warns_once_and_falls_back(monkeypatch):
    """The extension is built but onednn-cpu-gomp (libdnnl.so.3) is gone: one line, XLA's kernels."""
    monkeypatch.delenv(_loader.ENV_LIB, raising=False)
    proc = subprocess.run([sys.executable, "-c", _NO_ONEDNN_WHEEL], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip() == "system-onednn":
        pytest.skip("libdnnl.so.3 is on the system's library path")
    assert proc.stdout.strip() == "xla"
    lines = [ln for ln in proc.stderr.splitlines() if "lightflax" in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lightflax: native kernels disabled: cannot load ") and "libdnnl.so.3" in lines[0]
    assert "onednn-cpu-gomp (its libdnnl.so.3) is not installed" in lines[0]
    assert "Traceback" not in proc.stderr


def test_not_built_is_silent(monkeypatch):
    monkeypatch.delenv(_loader.ENV_LIB, raising=False)
    monkeypatch.setattr(_loader, "default_path", lambda: None)
    lib, reason, warning = _loader.load()
    assert lib is None and warning is None and "not built" in reason and "onednn-devel-cpu-gomp" in reason


# ---------------------------------------------------------------------------
# Convolution: values and gradients (x, w, b) against lax
# ---------------------------------------------------------------------------

# (n, h, w, c, o, k, stride, padding, bias, relu)
CONV_CASES = [
    (2, 9, 9, 3, 8, 3, 1, "VALID", True, True),  # xray_conv2d first layer
    (1, 8, 8, 8, 16, 3, 1, "SAME", True, False),
    (3, 7, 5, 5, 1, 3, 2, "SAME", True, True),  # asymmetric SAME padding (odd, stride 2)
    (2, 6, 6, 1, 4, 1, 1, "SAME", True, False),
    (1, 11, 10, 16, 6, 3, 2, "VALID", False, False),
    (2, 5, 5, 32, 5, 3, 1, "SAME", True, True),  # LightLayers bottleneck widths K=1..6
    (2, 5, 5, 4, 3, 3, 1, "SAME", True, True),
    (2, 5, 5, 2, 64, 3, 1, "SAME", True, False),
    (1, 6, 6, 64, 64, 1, 2, "SAME", True, True),
    (2, 4, 4, 2, 2, 1, 1, "VALID", False, True),
]


def _conv_fns(stride, padding, bias, relu):
    strides = (stride, stride)

    def ref(x, w, b):
        y = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + b if bias else y
        return nn.relu(y) if relu else y

    def nat(x, w, b):
        pads = layers.explicit_padding(x.shape, w.shape[:2], strides, padding)
        return native.conv2d(x, w, b if bias else None, strides, pads, nn.relu if relu else None,
                             lambda x, w: layers.lax_conv2d(x, w, strides, padding))

    return ref, nat


def _check_values_and_gradients(nat, ref, args, counter, bias, key):
    """One native call (``counter``) whose values, and gradients of a random linear loss with
    respect to (x, w, b) (b only with ``bias``), equal the reference's; returns (loss, the
    reference gradients)."""
    native.reset_call_counts()
    y = jax.block_until_ready(jax.jit(nat)(*args))
    assert native.call_counts()[counter] == 1
    assert_close(y, jax.jit(ref)(*args))  # references under jit too (op by op compiles every primitive)
    g = jax.random.normal(key, y.shape)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * g)  # noqa: E731
    got = jax.jit(jax.grad(loss(nat), argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(*args)
    for i, (a, e) in enumerate(zip(got, want)):
        if i == 2 and not bias:
            continue
        assert_close(a, e)
    return loss, want


@needs_native
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv_matches_lax(case):
    n, h, w, c, o, k, stride, padding, bias, relu = case
    ks = jax.random.split(jax.random.key(sum(case[:6])), 4)
    x = jax.random.normal(ks[0], (n, h, w, c))
    wt = jax.random.normal(ks[1], (k, k, c, o)) / np.sqrt(k * k * c)
    b = jax.random.normal(ks[2], (o,))
    ref, nat = _conv_fns(stride, padding, bias, relu)
    loss, want = _check_values_and_gradients(nat, ref, (x, wt, b), "conv_fwd", bias, ks[3])
    # gradients of the weights only: the backward-weights call alone (no dx), same values
    gw = jax.jit(jax.grad(loss(nat), argnums=(1, 2)))(x, wt, b)
    assert_close(gw[0], want[1])


@needs_native
def test_conv_vmap_and_unsupported_cases():
    ref, nat = _conv_fns(1, "SAME", True, True)
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (3, 2, 6, 6, 4))
    w = jax.random.normal(ks[1], (3, 3, 3, 4, 5))
    b = jax.random.normal(ks[2], (3, 5))
    assert_close(jax.jit(jax.vmap(nat))(x, w, b), jax.jit(jax.vmap(ref))(x, w, b))
    assert_close(jax.jit(jax.vmap(nat, in_axes=(0, None, None)))(x, w[0], b[0]),
                 jax.jit(jax.vmap(ref, in_axes=(0, None, None)))(x, w[0], b[0]))
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    got = jax.jit(jax.vmap(jax.grad(loss(nat), argnums=(0, 1, 2))))(x, w, b)
    want = jax.jit(jax.vmap(jax.grad(loss(ref), argnums=(0, 1, 2))))(x, w, b)
    for a, e in zip(got, want):
        assert_close(a, e)
    # bfloat16 and grouped convolutions take XLA's kernels: no native call
    native.reset_call_counts()
    y16 = jax.jit(nat)(x[0].astype(jnp.bfloat16), w[0].astype(jnp.bfloat16), b[0].astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    layers.conv2d(x[0], jnp.ones((3, 3, 1, 4)), (1, 1), "SAME", feature_group_count=4)
    assert native.call_counts()["conv_fwd"] == 0
    # second derivatives: an error (jax: the FFI call has no JVP rule), never a silently wrong number
    with pytest.raises(ValueError, match="cannot be differentiated"):
        jax.grad(lambda x: jnp.sum(jax.grad(loss(nat))(x, w[0], b[0])))(x[0])


# ---------------------------------------------------------------------------
# Depthwise convolution (native forward, XLA backward) and the backbone that uses it
# ---------------------------------------------------------------------------

DW_CASES = [  # n, h, w, c, k, stride, padding, bias, relu
    (2, 9, 7, 5, 3, 1, "SAME", False, False), (1, 12, 12, 8, 5, 2, "SAME", True, True),
    (3, 11, 11, 32, 3, 2, "VALID", True, False), (1, 7, 7, 1, 3, 1, "SAME", False, True),
    (2, 16, 15, 64, 5, 1, "VALID", False, False), (1, 14, 14, 144, 5, 2, "SAME", False, False),
]


def _dw_fns(c, stride, padding, bias, relu):
    strides = (stride, stride)

    def xla_conv(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c)

    def ref(x, w, b):
        y = xla_conv(x, w)
        y = y + b if bias else y
        return nn.relu(y) if relu else y

    def nat(x, w, b):
        pads = tuple(lax.padtype_to_pads(x.shape[-3:-1], w.shape[:2], strides, padding))
        return native.depthwise_conv2d(x, w, b if bias else None, strides, pads, nn.relu if relu else None,
                                       lambda x, w: lax.conv_general_dilated(
                                           x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                           feature_group_count=c))

    return ref, nat


@needs_native
@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: "-".join(map(str, c)))
def test_depthwise_matches_lax(case):
    """Values (one native call) and gradients (one native backward call: with the input's
    gradient, and without it, as for an image) equal lax's grouped convolution; under vmap too
    (--num_seeds)."""
    n, h, w, c, k, stride, padding, bias, relu = case
    ks = jax.random.split(jax.random.key(sum(case[:6])), 4)
    x = jax.random.normal(ks[0], (n, h, w, c))
    wt = jax.random.normal(ks[1], (k, k, 1, c)) / k
    b = jax.random.normal(ks[2], (c,))
    ref, nat = _dw_fns(c, stride, padding, bias, relu)
    _check_values_and_gradients(nat, ref, (x, wt, b), "dwconv_fwd", bias, ks[3])
    g = jax.random.normal(ks[3], jax.eval_shape(ref, x, wt, b).shape)
    for argnums in ((0, 1, 2), (1, 2)):  # (1, 2): the weights-only backward handler
        grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=argnums))  # noqa: E731
        native.reset_call_counts()
        got = jax.block_until_ready(grad(nat)(x, wt, b))
        assert native.call_counts()["dwconv_bwd"] == 1, native.call_counts()
        for gg, rr in zip(got, grad(ref)(x, wt, b)):
            assert_close(gg, rr)
    xs, ws = jnp.stack([x, -x]), jnp.stack([wt, 2 * wt])
    assert_close(jax.jit(jax.vmap(lambda x, w: nat(x, w, b)))(xs, ws),
                 jax.jit(jax.vmap(lambda x, w: ref(x, w, b)))(xs, ws))


@needs_native
def test_depthwise_unsupported_cases_take_xla():
    """A depth multiplier other than 1, float64/bfloat16 inputs and the xla switch: no native call,
    XLA's result."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    native.reset_call_counts()
    xla_conv = lambda m: lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
    w2 = jax.random.normal(jax.random.key(1), (3, 3, 1, 8))  # multiplier 2
    y = native.depthwise_conv2d(x, w2, None, (1, 1), ((1, 1), (1, 1)), None, xla_conv(2))
    assert_close(y, xla_conv(2)(x, w2))
    w1 = jax.random.normal(jax.random.key(2), (3, 3, 1, 4))
    y16 = native.depthwise_conv2d(x.astype(jnp.bfloat16), w1.astype(jnp.bfloat16), None, (1, 1), ((1, 1), (1, 1)),
                                  None, xla_conv(1))
    assert y16.dtype == jnp.bfloat16
    with native.kernels("xla"):
        native.depthwise_conv2d(x, w1, None, (1, 1), ((1, 1), (1, 1)), None, xla_conv(1))
    assert native.call_counts()["dwconv_fwd"] == 0


@needs_native
def test_efficientnet_depthwise_layer_is_flax_conv():
    """The backbone's DepthwiseConv has nn.Conv(feature_group_count=C)'s parameter and, natively
    or not, its values and gradients."""
    from lightflax.pretrained.efficientnet_lite0 import DepthwiseConv

    x = jax.random.normal(jax.random.key(3), (2, 13, 13, 24))
    for k, s in ((3, 1), (5, 2)):
        ours = DepthwiseConv(k, s)
        flax_conv = nn.Conv(24, (k, k), (s, s), padding="SAME", feature_group_count=24, use_bias=False)
        v = ours.init(jax.random.key(0), x)
        assert jax.tree_util.tree_map(jnp.shape, v) == jax.tree_util.tree_map(jnp.shape, flax_conv.init(
            jax.random.key(0), x))
        native.reset_call_counts()
        assert_close(jax.jit(ours.apply)(v, x), jax.jit(flax_conv.apply)(v, x))
        assert native.call_counts()["dwconv_fwd"] == 1
        f = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))  # noqa: E731
        got, want = jax.jit(jax.grad(f(ours), argnums=(0, 1)))(v, x), jax.jit(jax.grad(f(flax_conv), argnums=(0, 1)))(v, x)
        for a, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert_close(a, e)


# ---------------------------------------------------------------------------
# BatchNorm (train / eval, moving statistics, ReLU fused) and max pooling
# ---------------------------------------------------------------------------


def _bn_apply(module, variables, x, train):
    return module.apply(variables, x, mutable=["batch_stats"] if train else False)


@needs_native
@pytest.mark.parametrize("shape", [(4, 6, 5, 8), (1, 3, 3, 1), (2, 7, 9, 16), (3, 4, 4, 64)])
@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_matches_flax(shape, relu):
    ks = jax.random.split(jax.random.key(shape[-1]), 4)
    x = 3.0 + 2.0 * jax.random.normal(ks[0], shape)
    c = shape[-1]
    variables = {
        "params": {"scale": 1 + 0.1 * jax.random.normal(ks[1], (c,)), "bias": 0.1 * jax.random.normal(ks[2], (c,))},
        "batch_stats": {"mean": jnp.full((c,), 0.5), "var": jnp.full((c,), 2.0)},
    }
    g = jax.random.normal(ks[3], shape)
    for train in (True, False):
        ref_mod = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, use_fast_variance=False)

        def ref(v, x):
            out = _bn_apply(ref_mod, v, x, train)
            y, new = out if train else (out, None)
            return (nn.relu(y) if relu else y), new

        def nat(v, x):
            with native.kernels("native"):
                out = _bn_apply(layers.BatchNorm(train, relu=relu), v, x, train)
            return out if train else (out, None)

        native.reset_call_counts()
        (y1, s1), (y2, s2) = jax.jit(nat)(variables, x), jax.jit(ref)(variables, x)
        assert native.call_counts()["bn_fwd"] == 1
        assert_close(y1, y2)
        if train:
            for k in ("mean", "var"):
                assert_close(s1["batch_stats"][k], s2["batch_stats"][k], 1e-6)
        loss = lambda f: lambda v, x: jnp.sum(f(v, x)[0] * g)  # noqa: E731
        (gv1, gx1), (gv2, gx2) = jax.jit(jax.grad(loss(nat), argnums=(0, 1)))(variables, x), \
            jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(variables, x)
        assert_close(gx1, gx2)
        for k in ("scale", "bias"):
            assert_close(gv1["params"][k], gv2["params"][k])
        if not train:
            for k in ("mean", "var"):
                assert_close(gv1["batch_stats"][k], gv2["batch_stats"][k])


@needs_native
def test_batchnorm_init_and_variables_match_flax():
    x = jnp.ones((2, 4, 4, 3))
    a = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-3, use_fast_variance=False).init(
        jax.random.key(0), x)
    b = layers.BatchNorm(True, relu=True).init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(u, v)


BN_DEVICES_CODE = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from lightflax import layers, native, parallel
    from lightflax.native import ops
    one_call = ops._bn_train_fwd_impl

    def split_on_one_device(x, scale, bias, eps, relu, axis_name):  # the cross-device path, one device
        return ops._bn_train_across_devices(x, scale, bias, eps, relu, axis_name, 1)
    shape, eps = (16, 6, 5, 4), 1e-3
    ks = jax.random.split(jax.random.key(3), 4)
    x = 5.0 + jax.random.normal(ks[0], shape)  # a mean large against the spread (one-pass variance cancels)
    x = x.at[..., 1].set(0.3)  # a constant channel: mean == 0.3, variance 0, output == bias exactly
    c = shape[-1]
    scale, bias = 1 + 0.1 * jax.random.normal(ks[1], (c,)), 0.1 * jax.random.normal(ks[2], (c,))
    g = jax.random.normal(ks[3], shape)
    X, G, S, B = (np.asarray(a, np.float64) for a in (x, g, scale, bias))
    mu = X.mean((0, 1, 2)); var = ((X - mu) ** 2).mean((0, 1, 2)); inv = 1 / np.sqrt(var + eps)
    xh = (X - mu) * inv; pre = xh * S + B
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))
    worst = 0.0
    for relu in (False, True):
        gg = G * (pre > 0) if relu else G  # float64 reference (pre-activation > 0: the ReLU's gradient convention)
        want = dict(y=np.maximum(pre, 0) if relu else pre, mean=0.01 * mu, var=0.99 + 0.01 * var,
                    dx=S * inv * (gg - gg.mean((0, 1, 2)) - xh * (gg * xh).mean((0, 1, 2))),
                    dscale=(gg * xh).sum((0, 1, 2)), dbias=gg.sum((0, 1, 2)))
        runs = {}
        for kern, nd, split in (("native", 1, False), ("native", 1, True), ("native", 8, False), ("xla", 1, False),
                                ("xla", 8, False)):
            ops._bn_train_fwd_impl = split_on_one_device if split else one_call  # read at trace time
            mod = layers.BatchNorm(True, axis_name=parallel.AXIS, relu=relu)
            v = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": jnp.zeros(c), "var": jnp.ones(c)}}

            def f(v, x, g):
                def loss(v, x):
                    y, new = mod.apply(v, x, mutable=["batch_stats"])
                    return jnp.sum(y * g), (y, new["batch_stats"])
                (_, (y, st)), (gv, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(v, x)
                return y, st, jax.lax.psum(gv["params"], parallel.AXIS), gx

            with native.kernels(kern):
                native.reset_call_counts()
                fn = jax.jit(jax.shard_map(f, mesh=parallel.make_mesh(jax.devices()[:nd]), check_vma=False,
                                           in_specs=(P(), P(parallel.AXIS), P(parallel.AXIS)),
                                           out_specs=(P(parallel.AXIS), P(), P(), P(parallel.AXIS))))
                y, st, gp, gx = jax.device_get(fn(v, x, g))
                assert (sum(native.call_counts().values()) > 0) == (kern == "native"), native.call_counts()
                # the cross-device path (its reduce kernel) ran exactly where it was asked for
                assert (native.call_counts()["bn_reduce"] > 0) == (kern == "native" and (nd > 1 or split))
            got = dict(y=y, mean=st["mean"], var=st["var"], dx=gx, dscale=gp["scale"], dbias=gp["bias"])
            errs = {k: rel(got[k], want[k]) for k in want}
            print(relu, kern, nd, split, " ".join(f"{k} {e:.1e}" for k, e in errs.items()))
            if kern == "xla":  # XLA's constant channel carries rounding noise (x - mean != 0): compared without it
                keep = [k for k in range(c) if k != 1]
                errs = {k: rel(np.asarray(got[k])[..., keep], want[k][..., keep]) for k in want}
            worst = max(worst, *errs.values())
            if kern == "native":  # the constant channel exactly: y == bias (then ReLU), mean == 0.3, var == 0
                y1 = np.asarray(y)[..., 1]
                assert np.all(y1 == (max(float(bias[1]), 0.0) if relu else bias[1])), (relu, nd, np.unique(y1))
                assert st["mean"][1] == np.float32(0.01) * np.float32(0.3) and st["var"][1] == np.float32(0.99), st
            runs[(kern, nd, split)] = got
        # one device: the cross-device statistics (reduce -> merge -> apply) equal the one-call kernel bit for bit
        for k in want:
            np.testing.assert_array_equal(runs[("native", 1, True)][k], runs[("native", 1, False)][k], err_msg=k)
    assert worst <= 1e-5, worst
    print("ok")
    """
)


@needs_native
def test_batchnorm_one_and_eight_devices_match_float64():
    """BatchNorm alone on 1 and 8 simulated devices, native and XLA, against float64 NumPy: values,
    moving statistics and gradients; a constant channel stays exact natively on any device count."""
    proc = run_python(BN_DEVICES_CODE, devices=8)
    print(proc.stdout)
    assert proc.stdout.strip().endswith("ok"), proc.stdout


@needs_native
def test_constant_channel_tie_routing():
    """The dead-channel difference of xray_light k=1: two BatchNorms whose channel 0 is constant (a dead
    rank-1 bottleneck in front), added, ReLU, 2x2 max pooling (the residual block's a + s).

    Exactly, channel 0 of a + s is beta_a + beta_b = 0 everywhere: a ReLU kink and 4-way pool ties. Native
    computes x - mean == 0, so the sum is exactly 0 and the ReLU passes nothing (relu'(0) = 0, jax's
    convention); XLA's mean carries rounding noise, the sum is +-noise, and the ReLU passes the gradient when
    the noise is positive. Both are valid subgradients: the bias gradients of channel 0 are 0 (native) and
    0 or the one-sided derivative S (XLA). Every other channel, and the gradient of x, agree within 1e-5.
    """
    ks = jax.random.split(jax.random.key(5), 4)
    shape = (8, 6, 6, 4)
    xa = jax.random.normal(ks[0], shape).at[..., 0].set(0.3)
    xb = jax.random.normal(ks[1], shape).at[..., 0].set(-1.7)
    g = jax.random.normal(ks[2], (8, 3, 3, 4))
    c = shape[-1]
    v = {"params": {"scale": 1 + 0.1 * jax.random.normal(ks[3], (c,)), "bias": jnp.zeros(c)},
         "batch_stats": {"mean": jnp.zeros(c), "var": jnp.ones(c)}}

    def block(va, vb, xa, xb):
        a, _ = layers.BatchNorm(True).apply(va, xa, mutable=["batch_stats"])
        b, _ = layers.BatchNorm(True).apply(vb, xb, mutable=["batch_stats"])
        return jnp.sum(layers.max_pool_2x2(nn.relu(a + b)) * g), a + b

    out = {}
    for kern in ("native", "xla"):
        with native.kernels(kern):
            (_, pre), grads = jax.jit(jax.value_and_grad(block, argnums=(0, 1, 2, 3), has_aux=True))(v, v, xa, xb)
        out[kern] = pre, grads
    pre_n, (ga_n, gb_n, gxa_n, gxb_n) = out["native"]
    pre_x, (ga_x, gb_x, gxa_x, gxb_x) = out["xla"]
    print("channel 0 of a + b: native", np.unique(pre_n[..., 0]), "xla", np.unique(pre_x[..., 0]))
    assert np.all(pre_n[..., 0] == 0.0)  # exact: both BatchNorms output their bias (0) on the constant channel
    s_right = float(jnp.sum(g[..., 0]))  # the right derivative: every window's first element passes g
    for gv in (ga_n, gb_n, ga_x, gb_x):
        db0 = float(gv["params"]["bias"][0])
        assert min(abs(db0), abs(db0 - s_right)) <= 1e-5 * abs(s_right), (db0, s_right)
    assert float(ga_n["params"]["bias"][0]) == 0.0 and float(gb_n["params"]["bias"][0]) == 0.0
    for gn, gx in ((ga_n, ga_x), (gb_n, gb_x)):
        for k in ("scale", "bias"):
            assert_close(gn["params"][k][1:], gx["params"][k][1:])
    for gn, gx in ((gxa_n, gxa_x), (gxb_n, gxb_x)):
        assert_close(gn[..., 1:], gx[..., 1:])
        assert np.all(gn[..., 0] == 0.0)  # a constant channel's input gradient: the ReLU passed nothing


@needs_native
@pytest.mark.parametrize("shape", [(1, 4, 6, 3), (7, 5, 7, 2), (2, 9, 8, 5), (3, 2, 3, 1), (2, 16, 16, 32)])
def test_max_pool_matches_its_xla_formulation(shape):
    x = jnp.round(2 * jax.random.normal(jax.random.key(sum(shape)), shape))  # many ties
    g = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    nat = lambda x: native.max_pool_2x2(x, xla_pool.max_pool_2x2)  # noqa: E731
    native.reset_call_counts()
    y, vjp = jax.vjp(jax.jit(nat), x)
    np.testing.assert_array_equal(y, jax.jit(xla_pool.max_pool_2x2)(x))
    np.testing.assert_array_equal(vjp(g)[0], jax.vjp(jax.jit(xla_pool.max_pool_2x2), x)[1](g)[0])
    assert native.call_counts()["pool_fwd"] >= 1 and native.call_counts()["pool_bwd"] == 1
    xs = jnp.stack([x, -x])
    np.testing.assert_array_equal(jax.jit(jax.vmap(nat))(xs), jax.jit(jax.vmap(xla_pool.max_pool_2x2))(xs))


# ---------------------------------------------------------------------------
# Whole train steps: native == XLA (one step within 1e-5, 3 steps close), vmap, shard_map
# ---------------------------------------------------------------------------

STEP_CODE = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from lightflax import data, train, native, parallel
    from lightflax.config import RunConfig
    CASES = {cases!r}  # name: (model, kwargs, steps, seeds, replica mode, image size, gradient tolerance)


    def check(MODEL, KW, STEPS, SEEDS, MODE, SIZE, GRAD_TOL):
        d = data.load("synthetic", synthetic_shape=(SIZE, SIZE, 1),
                      synthetic_sizes={{"train": 64, "val": 8, "test": 8}}, num_classes=2, seed=0)
        # SGD: after one step p1 - p0 = -lr * gradient, so the step's gradients are compared directly
        # (Adam's first step is lr * sign(g), which turns the zero gradients of the biases in front of
        # a BatchNorm into sign noise).
        cfg = RunConfig.flat(workdir="unused", model=MODEL, model_kwargs=KW, batch_size=16, image_size=SIZE,
                        channels=3, optimizer="sgd", learning_rate=0.01, num_seeds=SEEDS, replica_mode=MODE)

        initial = []  # one initial state for every run: the steps are compared from the same start (random
        # draws that no kernel touches; initialising op by op took 2-4 s of CPU a run)

        def run(kernels, optimize=True):
            jax.config.update("jax_disable_most_optimizations", not optimize)
            with native.kernels(kernels):
                tr = train.Trainer(cfg, d)  # the trainer's own distributed step, traced under these kernels
                native.reset_call_counts()
                if not initial:
                    initial.append(jax.device_get(tr.init_state()))
                state = parallel.replicate(initial[0], tr.mesh); keys = tr.data_keys()
                images, labels = tr.device_split("train")
                perm = tr.permutations(0)
                out = [(jax.device_get(state.params), jax.device_get(state.batch_stats), None)]
                for i in range(STEPS):
                    state, m = tr.train_step(state, images, labels, perm, keys, tr.dev_ids)
                    out.append((jax.device_get(state.params), jax.device_get(state.batch_stats),
                                np.asarray(m["loss"], np.float64)))
            jax.config.update("jax_disable_most_optimizations", False)
            return out, native.call_counts()

        nat, counts = run("native")
        ref, xla_counts = run("xla")
        # XLA against itself compiled differently: the reference's own noise (bounds the state after many steps)
        alt, _ = run("xla", optimize=False) if STEPS > 2 else (ref, None)
        assert sum(xla_counts.values()) == 0, xla_counts
        assert all(counts[k] > 0 for k in ("conv_fwd", "conv_bwd", "bn_fwd", "pool_bwd")), counts
        leaves = jax.tree_util.tree_leaves
        sub = lambda a, b: jax.tree_util.tree_map(lambda u, v: u - v, a, b)

        def err(a, b):
            # max |a - b| over all leaves relative to the largest |b| of all leaves (one scale for the whole
            # model: a leaf whose gradient is a sum with cancellation, e.g. a bias in front of a BatchNorm,
            # is compared on the scale of the model's gradients, not on its own tiny scale)
            top = max(float(np.max(np.abs(v))) for v in leaves(b))
            return max(float(np.max(np.abs(u - v))) for u, v in zip(leaves(a), leaves(b))) / max(top, 1e-30)

        def rel(a, b):
            return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))

        # forward quantities of step 1: loss and the updated moving statistics, within 1e-5
        loss_err, stats_err = rel(nat[1][2], ref[1][2]), err(nat[1][1], ref[1][1])
        # gradients of step 1 (SGD: p1 - p0 = -lr * g), within GRAD_TOL of the model's gradient scale (see
        # GRAD_TOL in the test module), and the state after STEPS steps within 1e-3 or three times XLA's own
        # discrepancy (XLA compiled without optimisations against XLA: SGD amplifies last-bit differences).
        grad = lambda o: sub(o[1][0], o[0][0])
        grad_err, grad_noise = err(grad(nat), grad(ref)), err(grad(alt), grad(ref))
        top = max(float(np.max(np.abs(v))) for v in leaves(grad(ref)))
        worst = sorted(((float(np.max(np.abs(u - v))) / top, jax.tree_util.keystr(p))
                        for (p, v), u in zip(jax.tree_util.tree_leaves_with_path(grad(ref)), leaves(grad(nat)))))[-3:]
        print("worst gradient leaves", worst)
        last_err, last_noise = err(nat[-1][0], ref[-1][0]), err(alt[-1][0], ref[-1][0])
        print(MODEL, KW, SEEDS, MODE, "loss", loss_err, "stats", stats_err, "grad", grad_err, "xla noise",
              grad_noise, "last", last_err, "xla noise", last_noise, counts)
        assert loss_err <= 1e-5 and stats_err <= 1e-5, (loss_err, stats_err)
        assert grad_err <= GRAD_TOL, (grad_err, grad_noise)
        assert last_err <= max(1e-2, 3 * last_noise), (last_err, last_noise)
        assert rel(nat[-1][2], ref[-1][2]) <= max(1e-2, 3 * rel(alt[-1][2], ref[-1][2]))


    import traceback
    failed = 0
    for name, case in CASES.items():  # every case runs, each reports its own result
        print("=== CASE", name, flush=True)
        try:
            check(*case)
        except BaseException:
            failed += 1
            print("CASE", name, "FAILED", traceback.format_exc(), flush=True)
        else:
            print("CASE", name, "ok", flush=True)
    raise SystemExit(1 if failed else 0)
    """
)


# Gradients of one whole step agree within 1e-5 of the model's gradient scale where the model has no
# ties. xray_light k=1 has them at initialisation: its rank-1 bottlenecks are dead, so both BatchNorms of a
# residual block see constant channels, and channel c of a + s is exactly 0 natively (x - mean == 0) but
# +-rounding noise in XLA: a ReLU kink, routed differently, both valid subgradients
# (test_constant_channel_tie_routing). Measured (2026-11-30, docs/native.md): k=1 3.4e-2 (the tie), k=2 4.8e-6,
# k=3 2.3e-5 (the gradient of a bias in front of a BatchNorm, exactly 0, is rounding noise in both),
# k=4, k=5 < 1e-5; xray_conv2d 7.9e-5 (no constant channel: the first layer's kernel gradient, a sum
# that mostly cancels, which oneDNN accumulates ~8x less accurately than XLA; benchmarks/native_first_layer.py).
GRAD_TOL = {("xray_light", 1): 5e-2, ("xray_light", 3): 3e-5, ("xray_conv2d", None): 2e-4}


def _case(model, kw, steps, seeds=1, mode="vmap"):
    size = 52 if model == "xray_conv2d" else 32  # small images (xray_conv2d's smallest input is 50x50)
    return model, kw, steps, seeds, mode, size, GRAD_TOL.get((model, kw.get("k")), 1e-5)


def _run_steps(cases, devices=1):
    """Several whole-step comparisons in ONE subprocess (one interpreter and jax start for all); returns
    {name: that case's output}, each ending in "CASE name ok" or its failure."""
    proc = subprocess.run([sys.executable, "-c", STEP_CODE.format(cases=cases)], cwd=REPO, capture_output=True,
                          text=True, timeout=1800, env={"JAX_PLATFORMS": "cpu", **os.environ,
                                                        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    out = {}
    for part in proc.stdout.split("=== CASE ")[1:]:
        name, _, text = part.partition("\n")
        out[name] = text
    assert set(out) == set(cases) or proc.returncode != 0, (sorted(out), sorted(cases))
    return {name: out.get(name, f"no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            for name in cases}


def _assert_case(results, name):
    print(results[name])
    assert results[name].rstrip().endswith(f"CASE {name} ok"), results[name]


# The single-device cases: one subprocess for the module (a module fixture: the tests that use it run on one
# xdist worker). "Whole train steps close" runs 3 steps: the state after them is compared within
# max(1e-2, 3 x XLA's own optimised-vs-unoptimised discrepancy). After 20 steps that discrepancy was 0.15 for
# xray_light k=5 (a bound of 0.46); after 3 steps it is 6e-8 (bound 1e-2; native 1.2e-7) and 0.032 for
# xray_conv2d (bound 0.095; native 0.033) (2026-12-02, one run each).
ONE_DEVICE_CASES = {
    "xray_conv2d": _case("xray_conv2d", {}, 3),
    "xray_light-k5": _case("xray_light", {"k": 5}, 3),
    **{f"xray_light-k{k}": _case("xray_light", {"k": k}, 2) for k in (1, 2, 3, 4)},
    **{f"xray_conv2d-seeds2-{mode}": _case("xray_conv2d", {}, 2, seeds=2, mode=mode) for mode in ("vmap", "loop")},
}


@pytest.fixture(scope="module")
def one_device_steps():
    return _run_steps(ONE_DEVICE_CASES)


@needs_native
@pytest.mark.parametrize("name", ["xray_conv2d", "xray_light-k5"])
def test_train_steps_native_equal_xla(one_device_steps, name):
    """One step within tolerance, and 3 steps close (against XLA's own optimised-vs-not discrepancy)."""
    _assert_case(one_device_steps, name)


@needs_native
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_train_steps_native_equal_xla_light(one_device_steps, k):
    """xray_light k=1..4: one step (2 steps: the state after the second is compared too)."""
    _assert_case(one_device_steps, f"xray_light-k{k}")


@needs_native
def test_train_steps_shard_map_8_devices():
    _assert_case(_run_steps({"xray_light-k3-8devices": _case("xray_light", {"k": 3}, 2)}, devices=8),
                 "xray_light-k3-8devices")


@needs_native
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_train_steps_num_seeds(one_device_steps, mode):
    """2 replicas, vmapped and looped (2 steps: no extra unoptimised XLA reference, which needs > 2)."""
    _assert_case(one_device_steps, f"xray_conv2d-seeds2-{mode}")


@needs_native
@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "VALID")])
def test_separable_depthwise_on_the_native_kernel(stride, padding):
    """depthwise_conv2d(native_kernel=True) (opt-in, SeparableConv2D(depthwise_native=True)): the
    native kernel has the taps' values and gradients, and makes native forward and backward calls."""
    x = jax.random.normal(jax.random.key(0), (4, 9, 9, 6))
    w = jax.random.normal(jax.random.key(1), (3, 3, 6)) / 3
    g = jax.random.normal(jax.random.key(2), layers.depthwise_conv2d(x, w, (stride, stride), padding).shape)

    def value_and_grads(native_dw):
        def f(x, w):
            y, vjp = jax.vjp(lambda x, w: layers.depthwise_conv2d(x, w, (stride, stride), padding,
                                                                  native_kernel=native_dw), x, w)
            return y, vjp(g)

        native.reset_call_counts()
        out = jax.block_until_ready(jax.jit(f)(x, w))
        return out, native.call_counts()  # read after the (asynchronous) calls have run

    (v_nat, g_nat), calls = value_and_grads(True)
    assert calls["dwconv_fwd"] == 1 and calls["dwconv_bwd"] == 1, calls
    (v_taps, g_taps), calls = value_and_grads(False)
    assert calls["dwconv_fwd"] == 0
    assert_close(v_nat, v_taps)
    for a, b in zip(g_nat, g_taps):
        assert_close(a, b)


@needs_native
@pytest.mark.parametrize("model", [None, "mnist_separable"])
def test_depthwise_native_reaches_the_kernel_from_the_layer_and_the_model(model):
    """SeparableConv2D(depthwise_native=True) and models.create(..., depthwise_native=True) run the
    native depthwise kernel (the default layer does not) and give the default's values."""
    from lightflax import models

    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))

    def build(flag):
        if model is None:
            return layers.SeparableConv2D(4, 3, depthwise_native=flag)
        return models.create(model, depthwise_native=flag)

    variables = build(False).init(jax.random.key(1), x)
    outs = {}
    for flag in (False, True):
        native.reset_call_counts()
        outs[flag] = jax.block_until_ready(jax.jit(build(flag).apply)(variables, x))
        assert (native.call_counts()["dwconv_fwd"] > 0) == flag, (flag, native.call_counts())
    assert_close(outs[True], outs[False])
