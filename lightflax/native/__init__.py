"""Native CPU kernels (oneDNN convolutions, BatchNorm, 2x2 max pooling) through XLA FFI.

    >>> import lightflax.native as native
    >>> native.status()            # {'kernels': 'native'|'xla', 'reason': ..., ...}
    >>> native.set_kernels("xla")  # process-wide switch, read when a function is traced
    >>> with native.kernels("xla"):
    ...     step = jax.jit(train_step)  # traced here -> XLA's kernels

The switch is read at TRACE time: a function already jitted keeps the kernels
it was traced with. Default: ``native`` when the library is loaded, else
``xla`` (``$LIGHTFLAX_KERNELS=xla`` changes the default). Native kernels run
only on CPU (``lax.platform_dependent``: other platforms keep XLA's kernels)
and only for the cases they cover (float32, NHWC/HWIO, no dilation or groups);
everything else silently takes XLA's kernels. See docs/native.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from typing import Any, Callable, Dict, Iterator, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from lightflax.errors import UserError
from lightflax.native import _loader

KERNELS = ("native", "xla")
ENV_KERNELS = "LIGHTFLAX_KERNELS"
ENV_THREADS = "LIGHTFLAX_NATIVE_THREADS"
# Threads per native call: by default every CPU this process may use, shared among the CPU
# devices XLA runs concurrently (--xla_force_host_platform_device_count / jax_num_cpu_devices),
# at least 1. Chosen by measurement (docs/native.md, "Thread policy"): on a quiet 2-core machine
# 2 threads per call are 1.6-1.8x faster per step than 1 (OpenMP team); with the chunk runtime
# ("pool", set_runtime) 1.2-1.5x at the median under load 16-28 as well.

_LIB, _LOAD_REASON, _WARNING = _loader.load()
if _WARNING:
    _loader.warn(_WARNING)

_state = threading.local()
_global = {"kernels": None}


def _check_kernels(name: str) -> str:
    if name not in KERNELS:
        raise UserError(f"kernels must be one of {', '.join(KERNELS)}, got {name!r}")
    return name


def available() -> bool:
    """True when the native library is loaded and registered."""
    return _LIB is not None


def _default_kernels() -> str:
    env = os.environ.get(ENV_KERNELS, "").strip().lower()
    if env:
        return _check_kernels(env)
    # native where the library is loaded (active() checks that); set_kernels("xla") / --kernels=xla /
    # $LIGHTFLAX_KERNELS=xla keep XLA's kernels. (Opt-in until 2026-11-30: BUILD_NOTES, "Native CPU kernels".)
    return "native"


def requested() -> str:
    """The kernels asked for (set_kernels / kernels() / $LIGHTFLAX_KERNELS / default 'native')."""
    local = getattr(_state, "kernels", None)
    if local is not None:
        return local
    if _global["kernels"] is not None:
        return _global["kernels"]
    return _default_kernels()


def active() -> bool:
    """True when functions traced now use the native kernels (on CPU)."""
    on = available() and requested() == "native"
    if on:
        _resolve_threads()  # before the first native call runs (calls read it when they run)
    return on


def set_kernels(name: str) -> None:
    """Process-wide: 'native' (the default) or 'xla'. Read at trace time.

    'native' without the library falls back to XLA (status() says why).
    """
    _global["kernels"] = _check_kernels(name)


@contextlib.contextmanager
def kernels(name: str) -> Iterator[None]:
    """Within this block (this thread), functions are traced with ``name``'s kernels."""
    previous = getattr(_state, "kernels", None)
    _state.kernels = _check_kernels(name)
    try:
        yield
    finally:
        _state.kernels = previous


def set_threads(n: int) -> None:
    """Threads per native call (>= 1); replaces the automatic choice."""
    if not isinstance(n, int) or n < 1:
        raise UserError(f"native threads must be an integer >= 1, got {n!r}")
    _threads_policy["auto"] = False
    if _LIB is not None:
        _LIB.lib.lightflax_native_set_threads(n)


def threads() -> Optional[int]:
    _resolve_threads()
    return int(_LIB.lib.lightflax_native_get_threads()) if _LIB is not None else None


_threads_policy = {"auto": True}

RUNTIMES = ("pool", "openmp")  # the library's lf::Runtime values, in order


def set_runtime(name: str) -> None:
    """How a native call spreads over its threads: "pool" (the default: the call cut into more
    chunks than threads, single-threaded oneDNN per chunk, taken by the calling thread and a small
    worker pool) or "openmp" (the previous runtime: an OpenMP team per call; kept for A/B runs)."""
    if name not in RUNTIMES:
        raise UserError(f"native runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")
    if _LIB is not None:
        f = _LIB.lib.lightflax_native_set_runtime
        f.argtypes, f.restype = [ctypes.c_int64], None
        f(RUNTIMES.index(name))


def runtime() -> Optional[str]:
    if _LIB is None:
        return None
    f = _LIB.lib.lightflax_native_get_runtime
    f.restype = ctypes.c_int64
    return RUNTIMES[int(f())]


def _configured_cpu_devices(num_cpu_devices: Optional[int] = None, xla_flags: Optional[str] = None) -> int:
    """CPU devices XLA is configured to create (jax_num_cpu_devices, else XLA_FLAGS'
    --xla_force_host_platform_device_count, else 1), read without initialising a backend."""
    n = getattr(jax.config, "jax_num_cpu_devices", -1) if num_cpu_devices is None else num_cpu_devices
    if isinstance(n, int) and n > 0:
        return n
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return max(1, int(m.group(1))) if m else 1


def auto_threads() -> int:
    """The default threads per native call: usable CPUs // concurrently running CPU devices (>= 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // _configured_cpu_devices())


def _resolve_threads() -> None:
    if _threads_policy["auto"] and _LIB is not None:
        n = auto_threads()
        if int(_LIB.lib.lightflax_native_get_threads()) != n:
            _LIB.lib.lightflax_native_set_threads(n)


def _init_threads() -> None:
    raw = os.environ.get(ENV_THREADS, "").strip()
    if not raw:
        return
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        _loader.warn(f"lightflax: ${ENV_THREADS}={raw!r} is not an integer >= 1; choosing the threads automatically")
        return
    set_threads(n)


_init_threads()


def status() -> Dict[str, Any]:
    """Which kernels functions traced now use, and why: for the run log and results.json.

    ``{"kernels": "native"|"xla", "reason": str, "library": path|None, "onednn": version|None,
    "threads": int|None}``. On a non-CPU backend the native kernels are never run.
    """
    req = requested()
    if not available():
        kernels_, reason = "xla", _LOAD_REASON
    elif req == "xla":
        kernels_, reason = "xla", "XLA's kernels requested (set_kernels('xla') / --kernels=xla / $LIGHTFLAX_KERNELS)"
    elif jax.default_backend() != "cpu":
        kernels_, reason = "xla", f"native kernels are CPU-only; the default backend is {jax.default_backend()}"
    else:
        kernels_, reason = "native", _LOAD_REASON
    return {
        "kernels": kernels_,
        "reason": reason,
        "library": _LIB.path if _LIB is not None else None,
        "onednn": _LIB.dnnl_version if _LIB is not None else None,
        "threads": threads(),
        "runtime": runtime(),
    }


# The counted handler kinds, named by the library itself (its Counter enum); none without it.
_COUNTERS = _LIB.counter_names if _LIB is not None else ()


def call_counts() -> Dict[str, int]:
    """Native handler calls so far in this process (for benchmarks: which kernels ran)."""
    if _LIB is None:
        return {k: 0 for k in _COUNTERS}
    return {k: int(_LIB.lib.lightflax_native_calls(i)) for i, k in enumerate(_COUNTERS)}


def call_times() -> Dict[str, float]:
    """Seconds spent inside each kind of native handler so far in this process (wall time of
    the handler calls, summed over the threads XLA called them from; reset with the counts)."""
    if _LIB is None:
        return {k: 0.0 for k in _COUNTERS}
    return {k: 1e-9 * int(_LIB.lib.lightflax_native_time_ns(i)) for i, k in enumerate(_COUNTERS)}


def parallel_jobs() -> int:
    """Calls of the native parallel runtime that handed chunks to more than one thread so far
    (reset with the call counts): 0 at one thread, or when every loop was too small to split."""
    return int(_LIB.lib.lightflax_native_parallel_jobs()) if _LIB is not None else 0


def reset_call_counts() -> None:
    """Zero the call counts and times (and the parallel job count)."""
    if _LIB is not None:
        _LIB.lib.lightflax_native_reset_calls()


# ----------------------------------------------------------------------------
# The entry points lightflax.layers / models call. Each decides at trace time
# (native active, supported case) and otherwise runs the given XLA formulation.
# ----------------------------------------------------------------------------


def _is_relu(fn) -> bool:
    return fn is nn.relu or fn is jax.nn.relu


def _f32(*xs) -> bool:
    return all(x is None or x.dtype == jnp.float32 for x in xs)


def _fused_conv(op_name: str, supported: bool, x, w, bias, strides, pads, activation, xla_conv):
    """activation(xla_conv(x, w) + bias) through ``lightflax.native.ops.<op_name>`` (bias and ReLU
    fused) when ``supported`` and the native kernels are active, else XLA. The XLA formulation
    handed to the op (other platforms) includes the ReLU only when the op fuses it; any other
    activation is applied after."""

    def xla(x, w, b):
        y = xla_conv(x, w)
        if b is not None:
            y = y + b.astype(y.dtype)
        return activation(y) if activation is not None else y

    if not (supported and active() and _f32(x, w, bias)):
        return xla(x, w, bias)
    from lightflax.native import ops

    relu = _is_relu(activation)
    y = getattr(ops, op_name)(x, w, bias, strides, pads, relu,
                              lambda x, w, b: xla(x, w, b) if relu else xla_conv(x, w) + (b if b is not None else 0.0))
    if activation is not None and not relu:
        y = activation(y)
    return y


def conv2d(x, w, bias, strides, pads, activation: Optional[Callable], xla_conv: Callable):
    """activation(conv(x, w) + bias): native (bias and ReLU fused) when it can, else XLA.

    x NHWC (leading vmapped dims allowed), w HWIO, ``pads`` explicit ((top, bottom), (left, right)),
    ``xla_conv(x, w)`` the plain XLA convolution to use otherwise.
    """
    return _fused_conv("conv2d", x.ndim == 4 and w.ndim == 4, x, w, bias, strides, pads, activation, xla_conv)


def depthwise_conv2d(x, w, bias, strides, pads, activation: Optional[Callable], xla_conv: Callable):
    """activation(depthwise_conv(x, w) + bias) for w (KH, KW, 1, C) and x (..., C): native
    (forward with bias and ReLU fused, and backward) when it can, every other case XLA's.

    ``pads`` explicit ((top, bottom), (left, right)); ``xla_conv(x, w)`` the plain XLA grouped
    convolution (``feature_group_count=C``) to use otherwise.
    """
    supported = x.ndim == 4 and w.ndim == 4 and w.shape[2] == 1 and w.shape[3] == x.shape[-1]
    return _fused_conv("depthwise_conv2d", supported, x, w, bias, strides, pads, activation, xla_conv)


def max_pool_2x2(x, xla_pool: Callable):
    if not (active() and x.ndim == 4 and _f32(x)):
        return xla_pool(x)
    from lightflax.native import ops

    return ops.max_pool_2x2(x, xla_pool)


class BatchNorm(nn.BatchNorm):
    """flax ``nn.BatchNorm`` (same variables, same statistics), optionally followed by ReLU.

    Native (one FFI call forward, one backward; ReLU fused) for float32 NHWC in the
    configuration lightflax uses (last axis, scale and bias, two-pass variance);
    with ``axis_name`` (cross-device statistics) the local sums are psum-ed between
    native calls. Anything else runs flax's own code.
    """

    relu: bool = False

    def _native_ok(self, x, mask) -> bool:
        return (active() and mask is None and x.ndim == 4 and x.dtype == jnp.float32
                and self.dtype in (None, jnp.float32) and self.param_dtype == jnp.float32
                and self.axis in (-1, 3, (-1,), (3,)) and self.axis_index_groups is None
                and self.use_bias and self.use_scale and not self.use_fast_variance
                and self.force_float32_reductions)

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
        if not self._native_ok(x, mask):
            y = super().__call__(x, use_running_average, mask=mask)
            return nn.relu(y) if self.relu else y
        from flax.linen import module as flax_module

        from lightflax.native import ops

        use_running_average = flax_module.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        eps = self.epsilon
        relu = self.relu

        def xla_normalize(x, mean, var, scale, bias):
            y = (x - mean) * (lax_rsqrt(var + eps) * scale) + bias
            return nn.relu(y) if relu else y

        if use_running_average:
            return ops.batch_norm_infer(x, ra_mean.value, ra_var.value, scale, bias, eps, relu, xla_normalize)
        axis_name = self.axis_name if not self.is_initializing() else None

        def xla_train(x, scale, bias):
            from flax.linen.normalization import _compute_stats

            mean, var = _compute_stats(x, (0, 1, 2), dtype=None, axis_name=axis_name, use_fast_variance=False)
            return xla_normalize(x, mean, var, scale, bias), mean, var

        y, mean, var = ops.batch_norm_train(x, scale, bias, eps, relu, axis_name, xla_train)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def lax_rsqrt(v):
    return jax.lax.rsqrt(v)
