"""Test-time adaptation options of `predict`: AdaBN, EM label-shift estimation, temperature scaling.

    variables = adapt.adapt_bn(module, variables, inputs, apply_fn)   # BatchNorm statistics of `inputs`
    q = adapt.em_prior(probs, source_prior)                           # Saerens et al. (2002)
    t = adapt.fit_temperature(log_probs, labels)                      # at training, on the validation split
    probs = adapt.temperature_scale(probs, t)

AdaBN (Li et al. 2016) replaces every BatchNorm layer's moving statistics by the exact population
mean and (biased) variance of its input over ALL the images given, layer by layer: layer L's
statistics are measured with layers 1..L-1 already adapted (one forward pass over the images per
layer). Per-image moments are computed on device and combined in float64 on the host (Chan et
al.'s pairwise update), so the result does not depend on the chunk size of the forward passes.

:data:`MIN_IMAGES` (32): below it predict does not adapt (BatchNorm statistics or the class prior)
and says so. Training estimates BatchNorm statistics on batches of 64 images; half a training batch
keeps the adapted statistics' sampling noise within sqrt(2) of what the layers saw in training. For
EM, 32 images put the standard error of a two-class prior estimate at or below
sqrt(0.25 / 32) ~ 0.09, about the size of the shifts it is meant to find; fewer would replace the
stored prior with noise.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MIN_IMAGES = 32


def _is_bn(context) -> bool:
    return isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__"


def bn_inputs(apply_fn: Callable, variables, example: np.ndarray) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """{scope path: input shape} of the BatchNorm layers ``apply_fn(variables, x)`` calls, in call order."""
    shapes: Dict[Tuple[str, ...], Tuple[int, ...]] = {}

    def record(next_fun, args, kwargs, context):
        if _is_bn(context) and tuple(context.module.path) not in shapes:
            shapes[tuple(context.module.path)] = tuple(args[0].shape)
        return next_fun(*args, **kwargs)

    def run(v, x):
        with nn.intercept_methods(record):
            return apply_fn(v, x)

    jax.eval_shape(run, variables, example)
    return shapes


def _moments_fn(apply_fn: Callable, paths: List[Tuple[str, ...]]):
    """Jitted (variables, x) -> {path: (per-image mean (B, C), per-image sum of squared deviations
    (B, C))} of the input of every BatchNorm layer at ``paths`` (float32): one compilation serves
    every layer's pass."""
    def run(v, x):
        captured = {}

        def grab(next_fun, args, kwargs, context):
            if _is_bn(context) and tuple(context.module.path) not in captured:
                captured[tuple(context.module.path)] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            apply_fn(v, x)
        out = {}
        for i, path in enumerate(paths):
            h = captured[path].astype(jnp.float32)
            h = h.reshape(h.shape[0], -1, h.shape[-1])
            mean = jnp.mean(h, axis=1)
            out[i] = (mean, jnp.sum(jnp.square(h - mean[:, None, :]), axis=1))
        return out

    return jax.jit(run)


def combine_moments(means: np.ndarray, m2s: np.ndarray, n_each: int) -> Tuple[np.ndarray, np.ndarray]:
    """Population (mean, biased variance) (C,) of groups of ``n_each`` values with per-group means and
    sums of squared deviations (G, C), in float64 (Chan et al.: exact, no cancellation)."""
    means, m2s = np.asarray(means, np.float64), np.asarray(m2s, np.float64)
    mean = means.mean(axis=0)
    m2 = m2s.sum(axis=0) + n_each * np.sum(np.square(means - mean), axis=0)
    return mean, m2 / (n_each * len(means))


def _set_stats(variables, path: Tuple[str, ...], mean: np.ndarray, var: np.ndarray):
    node = variables["batch_stats"]
    for name in path:
        node = node[name]
    node["mean"] = jnp.asarray(mean, node["mean"].dtype)
    node["var"] = jnp.asarray(var, node["var"].dtype)


def adapt_bn(apply_fn: Callable, variables, inputs: np.ndarray, batch_size: int = 64):
    """``variables`` with every BatchNorm layer's moving statistics replaced by the population
    statistics of its input over all of ``inputs`` (layer by layer), and the number of layers
    adapted. ``apply_fn(variables, x)``: the model's inference forward pass."""
    out = _as_dict(variables)  # new nested dicts (leaves replaced, never mutated): the input stays as it was
    shapes = bn_inputs(apply_fn, out, inputs[:1])
    paths = list(shapes)
    fn = _moments_fn(apply_fn, paths) if paths else None
    for i, path in enumerate(paths):  # pass i: layers before i already adapted, layer i measured
        means, m2s = [], []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            pad = batch_size - len(chunk)
            if pad:  # one compiled shape; the padded rows are dropped below
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            m, s = fn(out, chunk)[i]
            means.append(np.asarray(m)[: batch_size - pad])
            m2s.append(np.asarray(s)[: batch_size - pad])
        n_each = int(np.prod(shapes[path][1:-1]))  # values per image and channel
        mean, var = combine_moments(np.concatenate(means), np.concatenate(m2s), n_each)
        _set_stats(out, path, mean, var)
    return out, len(paths)


def _as_dict(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def em_prior(probs: np.ndarray, source_prior: Sequence[float], tol: float = 1e-10, max_iter: int = 10_000
             ) -> np.ndarray:
    """The class prior of an unlabelled set, by EM on its posteriors (Saerens, Latinne & Decaestecker,
    2002): ``probs`` (N, C) are p(y | x) of a model trained at ``source_prior``; iterate
    q <- mean_i normalise(p_i * q / source_prior) from q = source_prior until it moves < ``tol``."""
    p = np.asarray(probs, np.float64)
    s = np.asarray(source_prior, np.float64)
    q = s.copy()
    for _ in range(max_iter):
        w = p * (q / s)
        new = np.mean(w / np.sum(w, axis=1, keepdims=True), axis=0)
        done = np.max(np.abs(new - q)) < tol
        q = new
        if done:
            break
    return q


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T): the same as dividing the logits by T (log-probabilities differ from
    the logits by a per-row constant, which softmax ignores). (N, C) float64."""
    with np.errstate(divide="ignore"):
        z = np.log(np.asarray(probs, np.float64)) / float(temperature)
    z = z - np.max(z, axis=1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=1, keepdims=True)


def nll(log_probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(log_probs / T)."""
    z = np.asarray(log_probs, np.float64) / temperature
    top = np.max(z, axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.sum(np.exp(z - top), axis=1))
    return float(np.mean(lse - z[np.arange(len(z)), np.asarray(labels)]))


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0
                    ) -> Optional[float]:
    """The temperature T in [lo, hi] minimising the NLL of ``labels`` (Guo et al. 2017), by golden
    section on 1/T (the NLL is convex in 1/T); None when it cannot be fitted (no labels, or
    non-finite log-probabilities)."""
    lp = np.asarray(log_probs, np.float64)
    if len(lp) == 0 or not np.all(np.isfinite(lp)):
        return None
    f = lambda beta: nll(lp, labels, 1.0 / beta)  # noqa: E731
    a, b = 1.0 / hi, 1.0 / lo
    g = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-7:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(2.0 / (a + b))


def describe(done: Sequence[str]) -> str:
    return ", adaptations: " + ("; ".join(done) if done else "none")

