"""The native kernels as JAX functions: custom_vjp rules over ``jax.ffi.ffi_call``.

Every public function here takes an XLA formulation (``xla=``) of the same
computation and dispatches with ``lax.platform_dependent``: the CPU lowering runs
the native kernel, any other platform the XLA formulation. Callers
(:mod:`lightflax.native`) only come here when the native library is loaded and
the case is supported (float32, no dilation; groups only as a depthwise convolution with
multiplier 1); everything else stays XLA.

``ffi_call(vmap_method="broadcast_all")``: under ``vmap`` every operand gets the
same leading dimensions and the handlers loop over them (one call per step, not
one per replica).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

Array = jax.Array
Pads = Tuple[Tuple[int, int], Tuple[int, int]]


def _call(target: str, outs, *args, **attrs):
    return jax.ffi.ffi_call(target, outs, vmap_method="broadcast_all")(*args, **attrs)


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _dispatch(native: Callable, xla: Callable, *args):
    return lax.platform_dependent(*args, cpu=native, default=xla)


def _zeros_if_symbolic(g, like_shape=None):
    if isinstance(g, SymbolicZero):
        return None
    return g


# ----------------------------------------------------------------------------
# Convolution: y = relu?(conv(x, w) + b), NHWC / HWIO, float32
# ----------------------------------------------------------------------------


# cfg = (strides, pads, bias, relu, kind): kind "conv" (w HWIO (KH, KW, C, O)) or "dwconv" (depthwise,
# multiplier 1: w (KH, KW, 1, C)); the handlers are lightflax_{kind}_fwd / _bwd / _bwd_w.


def _conv_attrs(cfg):
    (sh, sw), ((pt, pb), (pl, pr)), bias, relu, _ = cfg
    return dict(sh=np.int64(sh), sw=np.int64(sw), pt=np.int64(pt), pb=np.int64(pb), pl=np.int64(pl),
                pr=np.int64(pr), bias=np.int64(bias), relu=np.int64(relu))


def _conv_out_shape(x_shape, w_shape, cfg):
    (sh, sw), ((pt, pb), (pl, pr)), _, _, _ = cfg
    n, h, w, _ = x_shape
    kh, kw, _, o = w_shape
    return n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, o


def _conv_fwd_call(x, w, b, cfg):
    return _call(f"lightflax_{cfg[4]}_fwd", _sds(_conv_out_shape(x.shape, w.shape, cfg)), x, w, b,
                 **_conv_attrs(cfg))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv(x, w, b, cfg):
    return _conv_fwd_call(x, w, b, cfg)


def _conv_fwd(x, w, b, cfg):
    y = _conv_fwd_call(x.value, w.value, b.value, cfg)
    relu = cfg[3]
    # The pytree structure of the last residual records (statically) whether x needs a gradient.
    need_dx = () if x.perturbed else None
    return y, (x.value, w.value, y if relu else None, need_dx)


def _conv_bwd(cfg, res, g):
    x, w, y, need_dx = res
    if isinstance(g, SymbolicZero):
        g = jnp.zeros(g.shape, g.dtype)
    yy = y if y is not None else g  # the ReLU mask source; unused without relu
    o = w.shape[-1]
    kind = cfg[4]
    if need_dx is not None:
        dx, dw, db = _call(f"lightflax_{kind}_bwd", (_sds(x.shape), _sds(w.shape), _sds((o,))), g, x, w, yy,
                           **_conv_attrs(cfg))
    else:
        dw, db = _call(f"lightflax_{kind}_bwd_w", (_sds(w.shape), _sds((o,))), g, x, w, yy, **_conv_attrs(cfg))
        dx = None
    return dx, dw, db


_conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)


def _conv_dispatch(kind, x, w, b, strides, pads, relu, xla):
    has_bias = b is not None
    cfg = (tuple(strides), tuple(tuple(p) for p in pads), has_bias, bool(relu), kind)
    bb = b if has_bias else jnp.zeros((w.shape[-1],), jnp.float32)
    return _dispatch(lambda x, w, bb: _conv(x, w, bb, cfg), lambda x, w, bb: xla(x, w, bb if has_bias else None),
                     x, w, bb)


def conv2d(x: Array, w: Array, b: Optional[Array], strides: Tuple[int, int], pads: Pads, relu: bool,
           xla: Callable[[Array, Array, Optional[Array]], Array]) -> Array:
    """relu?(conv(x, w) + b) natively on CPU; ``xla(x, w, b)`` elsewhere."""
    return _conv_dispatch("conv", x, w, b, strides, pads, relu, xla)


def depthwise_conv2d(x: Array, w: Array, b: Optional[Array], strides: Tuple[int, int], pads: Pads, relu: bool,
                     xla: Callable[[Array, Array, Optional[Array]], Array]) -> Array:
    """relu?(depthwise_conv(x, w) + b), w (KH, KW, 1, C), natively on CPU (oneDNN's depthwise
    kernels, forward and backward; XLA:CPU's grouped convolution runs at ~0.5 GFLOP/s);
    ``xla(x, w, b)`` elsewhere."""
    return _conv_dispatch("dwconv", x, w, b, strides, pads, relu, xla)


# ----------------------------------------------------------------------------
# BatchNorm over (N, H, W) per channel, float32, Keras/flax semantics
# ----------------------------------------------------------------------------


def _axis_size(axis_name) -> int:
    if axis_name is None:
        return 1
    return int(lax.psum(1, axis_name))


def _merge_means(local, axis_name, ndev: int):
    """The mean over devices of equally weighted per-device means, as device 0's plus the mean deviation."""
    first = lax.psum(jnp.where(lax.axis_index(axis_name) == 0, local, jnp.zeros_like(local)), axis_name)
    return first + lax.psum(local - first, axis_name) / ndev


def _bn_train_fwd_impl(x, scale, bias, eps, relu, axis_name):
    pc = _sds(scale.shape)
    ndev = _axis_size(axis_name)
    if ndev == 1:
        y, mean, var = _call("lightflax_bn_train", (_sds(x.shape), pc, pc), x, scale, bias,
                             eps=np.float32(eps), relu=np.int64(relu))
        return y, mean, var
    return _bn_train_across_devices(x, scale, bias, eps, relu, axis_name, ndev)


def _bn_train_across_devices(x, scale, bias, eps, relu, axis_name, ndev: int):
    """Statistics over ``axis_name`` (reduce -> merge -> apply); tests run it on one device too."""
    pc = _sds(scale.shape)
    # Every device holds the same number of examples, so the global statistics are the means of the
    # local ones. They are merged as deviations from device 0's: mean = m0 + psum(m_d - m0) / n. With
    # one device this is m0 exactly, the one-call kernel's statistics bit for bit; a channel whose
    # local means are equal (a constant channel: mean == its value) stays exact. (Summing the local
    # float sums, as before, rounded the mean differently from the one-call kernel: 1 vs 8 devices
    # then differed by an ulp of the mean, enough to flip a near-tie in cifar_separable's step.)
    mean = _merge_means(_call("lightflax_bn_reduce", pc, x, scale, mode=np.int64(0)), axis_name, ndev)
    var = _merge_means(_call("lightflax_bn_reduce", pc, x, mean, mode=np.int64(1)), axis_name, ndev)
    y = _call("lightflax_bn_apply", _sds(x.shape), x, mean, var, scale, bias, eps=np.float32(eps),
              relu=np.int64(relu))
    return y, mean, var


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn_train(x, scale, bias, eps, relu, axis_name):
    return _bn_train_fwd_impl(x, scale, bias, eps, relu, axis_name)


def _bn_train_fwd(x, scale, bias, eps, relu, axis_name):
    y, mean, var = _bn_train_fwd_impl(x.value, scale.value, bias.value, eps, relu, axis_name)
    return (y, mean, var), (x.value, y if relu else None, mean, var, scale.value)


def _bn_train_bwd(eps, relu, axis_name, res, cts):
    x, y, mean, var, scale = res
    gy, gmean, gvar = cts
    pc = _sds(scale.shape)
    ndev = _axis_size(axis_name)
    if isinstance(gy, SymbolicZero):
        gy = jnp.zeros(x.shape, x.dtype)
    yy = y if y is not None else gy
    if ndev == 1:
        dx, dscale, dbias = _call("lightflax_bn_bwd", (_sds(x.shape), pc, pc), gy, x, yy, mean, var, scale,
                                  eps=np.float32(eps), relu=np.int64(relu), train=np.int64(1))
    else:
        count = float(np.prod(x.shape[-4:-1])) * ndev
        dbias, dscale = _call("lightflax_bn_bwd_reduce", (pc, pc), gy, x, yy, mean, var, eps=np.float32(eps),
                              relu=np.int64(relu))
        sg, sgx = lax.psum((dbias, dscale), axis_name)
        dx = _call("lightflax_bn_bwd_apply", _sds(x.shape), gy, x, yy, mean, var, scale, sg, sgx,
                   eps=np.float32(eps), relu=np.int64(relu), train=np.int64(1), count=np.float64(count))
    # Cotangents of the returned batch statistics (zero in training: they only feed the
    # moving averages) through mean = sum(x) / count and var = sum((x - mean)^2) / count.
    count = float(np.prod(x.shape[-4:-1])) * ndev
    expand = (slice(None),) * (x.ndim - 4) + (None, None, None)
    if not isinstance(gmean, SymbolicZero):
        gm = lax.psum(gmean, axis_name) if ndev > 1 else gmean
        dx = dx + (gm / count)[expand + (slice(None),)]
    if not isinstance(gvar, SymbolicZero):
        gv = lax.psum(gvar, axis_name) if ndev > 1 else gvar
        dx = dx + (2.0 / count) * (x - mean[expand + (slice(None),)]) * gv[expand + (slice(None),)]
    return dx, dscale, dbias


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd, symbolic_zeros=True)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _bn_infer(x, mean, var, scale, bias, eps, relu):
    return _call("lightflax_bn_apply", _sds(x.shape), x, mean, var, scale, bias, eps=np.float32(eps),
                 relu=np.int64(relu))


def _bn_infer_fwd(x, mean, var, scale, bias, eps, relu):
    y = _bn_infer(x, mean, var, scale, bias, eps, relu)
    return y, (x, y if relu else None, mean, var, scale)


def _bn_infer_bwd(eps, relu, res, gy):
    x, y, mean, var, scale = res
    pc = _sds(scale.shape)
    yy = y if y is not None else gy
    dx, dscale, dbias = _call("lightflax_bn_bwd", (_sds(x.shape), pc, pc), gy, x, yy, mean, var, scale,
                              eps=np.float32(eps), relu=np.int64(relu), train=np.int64(0))
    dmean = -dbias * scale * lax.rsqrt(var + eps)
    dvar = -0.5 * dscale * scale / (var + eps)
    return dx, dmean, dvar, dscale, dbias


_bn_infer.defvjp(_bn_infer_fwd, _bn_infer_bwd)


def batch_norm_train(x, scale, bias, eps: float, relu: bool, axis_name, xla: Callable):
    """-> (y, batch mean, batch variance); ``xla(x, scale, bias)`` off CPU."""
    return _dispatch(lambda x, s, b: _bn_train(x, s, b, float(eps), bool(relu), axis_name), xla, x, scale, bias)


def batch_norm_infer(x, mean, var, scale, bias, eps: float, relu: bool, xla: Callable):
    return _dispatch(lambda x, m, v, s, b: _bn_infer(x, m, v, s, b, float(eps), bool(relu)), xla,
                     x, mean, var, scale, bias)


# ----------------------------------------------------------------------------
# 2x2 max pooling, stride 2, VALID (gradient to the first maximum, row-major)
# ----------------------------------------------------------------------------


@jax.custom_vjp
def _pool(x):
    *lead, h, w, c = x.shape
    return _call("lightflax_pool_fwd", _sds((*lead, h // 2, w // 2, c)), x)


def _pool_fwd(x):
    return _pool(x), x


def _pool_bwd(x, g):
    return (_call("lightflax_pool_bwd", _sds(x.shape), x, g),)


_pool.defvjp(_pool_fwd, _pool_bwd)


def max_pool_2x2(x: Array, xla: Callable) -> Array:
    return _dispatch(_pool, xla, x)
