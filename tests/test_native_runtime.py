"""The native kernels' parallel runtime (lightflax/native/csrc/parallel.h): every index runs once,
reductions and whole kernels give the same bits at 1, 2 and 3 threads and under either runtime's
chunking, and concurrent calls from several threads stay correct."""

import ctypes
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from lightflax import layers, native
from lightflax.errors import UserError

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native library not loaded: {native.status()['reason']}")


def _lib():
    lib = native._LIB.lib
    lib.lightflax_native_parallel_check.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.lightflax_native_parallel_check.restype = ctypes.c_int64
    lib.lightflax_native_channel_sums.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.lightflax_native_channel_sums.restype = None
    return lib


@pytest.fixture
def threads_and_runtime():
    """Lets a test set the thread count and the runtime; restores both afterwards."""
    lib = native._LIB.lib
    before = (int(lib.lightflax_native_get_threads()), native.runtime(), dict(native._threads_policy))
    yield
    lib.lightflax_native_set_threads(before[0])
    native.set_runtime(before[1])
    native._threads_policy.update(before[2])


def test_set_runtime_checks_its_argument():
    with pytest.raises(UserError, match="runtime must be one of pool, openmp"):
        native.set_runtime("tbb")


@needs_native
@pytest.mark.parametrize("runtime", ["pool", "openmp"])
def test_parallel_for_runs_every_index_once(runtime, threads_and_runtime):
    lib = _lib()
    native.set_runtime(runtime)
    for threads in (1, 2, 3):
        native.set_threads(threads)
        for n in (0, 1, 2, 255, 256, 257, 1000, 4097, 100_003):
            for grain in (1, 256, 5000):
                counts = np.zeros(max(n, 1), np.int64)
                max_tid = lib.lightflax_native_parallel_check(n, grain, counts.ctypes.data)
                assert np.all(counts[:n] == 1), (runtime, threads, n, grain, np.unique(counts[:n]))
                assert -1 <= max_tid < threads and (n == 0) == (max_tid == -1)


@needs_native
def test_channel_sums_equal_float64_and_do_not_depend_on_threads(threads_and_runtime):
    lib = _lib()
    rng = np.random.default_rng(0)
    for m, c in ((1, 3), (4095, 8), (70_001, 32), (12_345, 5)):
        x = (3.0 + rng.standard_normal((m, c))).astype(np.float32)
        got = {}
        for runtime in ("pool", "openmp"):
            native.set_runtime(runtime)
            for threads in (1, 2, 3):
                native.set_threads(threads)
                out = np.zeros(c, np.float64)
                lib.lightflax_native_channel_sums(x.ctypes.data, m, c, out.ctypes.data)
                got[(runtime, threads)] = out
        want = x.astype(np.float64).sum(0)
        for k, v in got.items():
            np.testing.assert_allclose(v, want, rtol=1e-6, err_msg=str(k))
            np.testing.assert_array_equal(v, got[("pool", 1)], err_msg=str(k))  # chunks by m only


def _conv_and_bn_step(stride, relu):
    """values and gradients of a conv (bias, ReLU) + BatchNorm(train) + max pool: every kind of
    native call, its chunked forms included."""
    strides = (stride, stride)

    def f(x, w, b, scale, bias):
        pads = layers.explicit_padding(x.shape, w.shape[:2], strides, "SAME")
        y = native.conv2d(x, w, b, strides, pads, nn.relu if relu else None,
                          lambda x, w: layers.lax_conv2d(x, w, strides, "SAME"))
        v = {"params": {"scale": scale, "bias": bias},
             "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}}
        y, _ = layers.BatchNorm(True, relu=True).apply(v, y, mutable=["batch_stats"])
        return native.max_pool_2x2(y, None)

    def loss(*a):
        return jnp.sum(f(*a) * jnp.cos(jnp.arange(f(*a).size).reshape(f(*a).shape)))

    return jax.jit(f), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def _ref_conv(x, w, b, stride, relu):
    y = lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    return nn.relu(y) if relu else y


@needs_native
@pytest.mark.parametrize("n,stride,relu", [(13, 1, True), (8, 2, False), (1, 1, True), (19, 1, False)])
def test_kernels_give_the_same_bits_at_1_2_3_threads(n, stride, relu, threads_and_runtime):
    ks = jax.random.split(jax.random.key(n), 5)
    x = jax.random.normal(ks[0], (n, 12, 10, 8))
    w = jax.random.normal(ks[1], (3, 3, 8, 16)) / np.sqrt(72)
    b = 0.1 * jax.random.normal(ks[2], (16,))
    scale, bias = 1 + 0.1 * jax.random.normal(ks[3], (16,)), 0.1 * jax.random.normal(ks[4], (16,))
    args = (x, w, b, scale, bias)
    with native.kernels("native"):
        fwd, grad = _conv_and_bn_step(stride, relu)
        native.set_runtime("pool")
        results = {}
        for threads in (1, 2, 3):
            native.set_threads(threads)
            native.reset_call_counts()
            results[threads] = jax.tree_util.tree_leaves(jax.block_until_ready((fwd(*args), grad(*args))))
            counts = native.call_counts()
            assert counts["conv_fwd"] >= 1 and counts["conv_bwd"] == 1 and counts["bn_bwd"] == 1
        for threads in (2, 3):
            for a, e in zip(results[threads], results[1]):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=f"threads={threads}")
        # the chunked convolution against lax (the full step's reference: tests/test_native.py)
        native.set_threads(2)
        nat = jax.jit(lambda x, w, b: native.conv2d(
            x, w, b, (stride, stride), layers.explicit_padding(x.shape, w.shape[:2], (stride, stride), "SAME"),
            nn.relu if relu else None, lambda x, w: layers.lax_conv2d(x, w, (stride, stride), "SAME")))
        g = jax.random.normal(ks[4], jax.eval_shape(nat, x, w, b).shape)
        # the reference once, under jit (op by op, every primitive was compiled on its own)
        ref = jax.jit(lambda x, w, b: _ref_conv(x, w, b, stride, relu))
        y_ref = ref(x, w, b)
        want = jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a) * g), argnums=(0, 1, 2)))(x, w, b)
        nat_grad = jax.jit(jax.grad(lambda *a: jnp.sum(nat(*a) * g), argnums=(0, 1, 2)))
        for runtime in ("pool", "openmp"):
            native.set_runtime(runtime)  # read at call time: the same program, each runtime's chunking
            got = nat_grad(x, w, b)
            np.testing.assert_allclose(nat(x, w, b), y_ref, rtol=1e-5, atol=1e-5)
            for a, e in zip(got, want):
                scale_ = float(np.max(np.abs(np.asarray(e))))
                assert float(np.max(np.abs(np.asarray(a) - np.asarray(e)))) <= 1e-5 * scale_, runtime


@needs_native
def test_batchnorm_and_pool_loops_are_spread_over_threads(threads_and_runtime):
    """At the study's first-block shape (batch 32, 28x28, 8 channels: 13 chunks of rows) the
    BatchNorm and pooling loops are handed to more than one thread at 2 threads (none at 1), and
    give the same bits either way. (A grain meant for single rows once ran these chunk loops on one
    thread: this test would have failed.)"""
    bn = layers.BatchNorm(True, relu=True)
    ks = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(ks[0], (32, 28, 28, 8))
    g = jax.random.normal(ks[1], (32, 14, 14, 8))
    v = {"params": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
         "batch_stats": {"mean": jnp.zeros(8), "var": jnp.ones(8)}}

    def loss(x):  # BatchNorm (train, ReLU) then 2x2 max pool, forward and backward: loops only
        y, _ = bn.apply(v, x, mutable=["batch_stats"])
        return jnp.sum(native.max_pool_2x2(y, None) * g)

    native.set_runtime("pool")
    with native.kernels("native"):
        f = jax.jit(jax.value_and_grad(loss))
        out, jobs = {}, {}
        for threads in (1, 2):
            native.set_threads(threads)
            jax.block_until_ready(f(x))  # compiled and warm
            native.reset_call_counts()
            out[threads] = [np.asarray(a) for a in jax.block_until_ready(f(x))]
            counts, jobs[threads] = native.call_counts(), native.parallel_jobs()
            assert counts["bn_fwd"] == 1 and counts["bn_bwd"] == 1 and counts["pool_fwd"] == 1, counts
    assert jobs[1] == 0
    assert jobs[2] >= 4, jobs  # BatchNorm statistics and apply, its backward's two passes, pooling
    for a, e in zip(out[2], out[1]):
        np.testing.assert_array_equal(a, e)


@needs_native
def test_concurrent_calls_from_several_threads(threads_and_runtime):
    """Two host threads run native convolutions at once (the pool serves one call; the other runs
    its chunks on its own thread): every result equals the one-thread result."""
    native.set_runtime("pool")
    native.set_threads(2)
    ks = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(ks[0], (16, 20, 20, 8))
    w = jax.random.normal(ks[1], (3, 3, 8, 8)) / np.sqrt(72)
    with native.kernels("native"):
        f = jax.jit(jax.grad(lambda x, w: jnp.sum(native.conv2d(
            x, w, None, (1, 1), ((1, 1), (1, 1)), nn.relu, lambda x, w: layers.lax_conv2d(x, w, (1, 1), "SAME")) ** 2),
            argnums=(0, 1)))
        want = [np.asarray(a) for a in f(x, w)]
        errors = []

        def run():
            try:
                for _ in range(10):
                    for a, e in zip(f(x, w), want):
                        np.testing.assert_array_equal(np.asarray(a), e)
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        ts = [threading.Thread(target=run) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors, errors[0]
