"""Speed-study contenders: layers and whole models, as ``timing.Variant``s.

A *group* is a set of variants measured on the same shapes with
``timing.measure_interleaved`` (the one timing harness). Every variant is
compiled ahead of time (compile time reported apart, XLA cost analysis read).
The model rows time the trainer's own compiled train step.
"""

from __future__ import annotations

import csv
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp

from lightflax import figures, layers, tables, timing

LAYER_KINDS = ("conv2d", "separable", "light_conv", "light_einsum", "lowrank")


def make_layer(kind: str, features: int, k: int, kernel: int = 3, dtype=None):
    if kind == "conv2d":
        return layers.Conv2D(features, kernel, impl="conv", dtype=dtype)
    if kind == "conv2d_einsum":
        return layers.Conv2D(features, kernel, impl="einsum", dtype=dtype)
    if kind == "separable":
        return layers.SeparableConv2D(features, kernel, dtype=dtype)
    if kind == "light_conv":
        return layers.LightConv2D(features, kernel, k, impl="conv", dtype=dtype)
    if kind == "light_einsum":
        return layers.LightConv2D(features, kernel, k, impl="einsum", dtype=dtype)
    if kind == "lowrank":
        return layers.LowRankConv2D(features, kernel, k, dtype=dtype)
    raise ValueError(f"layer kind must be one of {LAYER_KINDS + ('conv2d_einsum',)}, got {kind!r}")


def layer_variant(kind: str, mode: str, *, batch: int, size: int, c_in: int, c_out: int, k: int,
                  dtype=None) -> timing.Variant:
    layer = make_layer(kind, c_out, k, dtype=dtype)
    x = jax.random.uniform(jax.random.key(1), (batch, size, size, c_in))
    params = layer.init(jax.random.key(0), x)
    if mode == "fwd":
        fn = jax.jit(lambda p, x: layer.apply(p, x))
    elif mode == "fwd+bwd":
        fn = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.square(layer.apply(p, x).astype(jnp.float32))),
                              argnums=(0, 1)))
    else:
        raise ValueError(f"mode must be fwd or fwd+bwd, got {mode!r}")
    name = kind if kind in ("conv2d", "separable", "conv2d_einsum") else f"{kind} k={k}"
    return timing.Variant(name, timing.aot_compile(fn, params, x), (params, x),
                          info={"kind": kind, "k": k, "mode": mode, "batch": batch, "size": size, "c_in": c_in,
                         "c_out": c_out})


def model_variant(model: str, model_kwargs: Dict[str, Any], *, batch: int, size: int, channels: int = 3,
                  parallel: str = "shard_map", dtype: str = "float32", num_classes: int = 2,
                  num_seeds: int = 1, replica_mode: str = "vmap", devices: Optional[Sequence[Any]] = None,
                  seed: int = 0, compiler_options: Optional[Dict[str, Any]] = None, label: Optional[str] = None,
                  optimizer: str = "adam") -> timing.Variant:
    """The trainer's own compiled train step on device-resident synthetic data
    (``devices``: the data-parallel mesh, default every device)."""
    from lightflax import data as data_lib, train
    from lightflax.config import RunConfig

    n = max(2 * batch, 8)
    data = data_lib.load("synthetic", synthetic_shape=(size, size, 1),
                         synthetic_sizes={"train": n, "val": batch, "test": batch}, num_classes=num_classes)
    cfg = RunConfig.flat(workdir="", model=model, model_kwargs=dict(model_kwargs), batch_size=batch,
                    image_size=size, channels=channels, parallel=parallel, dtype=dtype, num_seeds=num_seeds,
                    replica_mode=replica_mode, seed=seed, optimizer=optimizer)
    tr = train.Trainer(cfg, data, devices=devices)
    state = tr.init_state()
    images, labels = tr.device_split("train")
    keys = tr.data_keys()
    perm = tr.permutations(0)
    compiled = timing.aot_compile(tr, state, images, labels, perm, keys, compiler_options=compiler_options)
    label = label or model + "".join(f" {k}={v}" for k, v in model_kwargs.items()) + (
        f" x{num_seeds} seeds ({replica_mode})" if num_seeds > 1 else "") + (
        f" {parallel}" if parallel != "shard_map" else "") + (
        f" {tr.n_devices} dev" if devices is not None else "") + (f" {dtype}" if dtype != "float32" else "")
    return timing.Variant(label, compiled, (state, images, labels, perm, keys, tr.dev_ids),
                          next_args=lambda out, a: (out[0],) + tuple(a[1:]),
                          info={"kind": "model", "model": model, **model_kwargs, "mode": "train_step",
                                "batch": batch, "size": size, "parallel": parallel, "dtype": dtype,
                                "num_seeds": num_seeds, "replica_mode": replica_mode, "devices": tr.n_devices})


ROW_COLUMNS = ["variant", "mode", "batch", "size", "c_in", "c_out", "median_ms", "p10_ms", "p90_ms",
               "ratio_to_baseline", "images_per_s", "compile_s", "gflops", "gbytes", "achieved_gflops_per_s",
               "arithmetic_intensity", "peak_mb"]


def markdown(rows: List[Dict[str, Any]], columns: Sequence[str] = ROW_COLUMNS) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    return tables.markdown_table(cols, [[fmt(r.get(c)) for c in cols] for r in rows]).rstrip("\n")


def write_csv(path: str, rows: List[Dict[str, Any]]) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def roofline_plot(path: str, rows: List[Dict[str, Any]], title: str = "") -> None:
    """Achieved GFLOP/s against arithmetic intensity (FLOPs per byte) per row."""
    fig, ax = figures.pyplot().subplots(figsize=(7, 5))
    kinds = sorted({r["variant"].split(" ")[0] for r in rows})
    for i, kind in enumerate(kinds):
        pts = [r for r in rows if r["variant"].split(" ")[0] == kind and r.get("arithmetic_intensity")]
        if pts:
            ax.scatter([p["arithmetic_intensity"] for p in pts], [p["achieved_gflops_per_s"] for p in pts],
                       label=kind, color=f"C{i}", s=18)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (XLA FLOPs / bytes accessed)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(title)
    ax.legend(fontsize=8)
    figures.save(fig, path)


def time_plot(path: str, rows: List[Dict[str, Any]], x: str, title: str = "") -> None:
    fig, ax = figures.pyplot().subplots(figsize=(7, 4.5))
    for i, name in enumerate(sorted({(r["variant"], r.get("mode")) for r in rows})):
        pts = sorted((r[x], r["median_ms"]) for r in rows if (r["variant"], r.get("mode")) == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name[0]} ({name[1]})", color=f"C{i % 10}")
    ax.set_xlabel(x)
    ax.set_ylabel("median ms")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=6)
    figures.save(fig, path)
