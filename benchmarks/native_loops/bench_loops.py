"""Microbenchmark of lightflax's hand-written loops, one thread: today's (old_loops.h) vs loops.h's
(baseline x86-64 and AVX2 versions), on the shapes of the study's models at a given size/batch.

    python benchmarks/native_loops/bench_loops.py --size=160 --batch=32 --rounds=5
    python benchmarks/native_loops/bench_loops.py --check_only

Checks every version against float64 NumPy (values; BatchNorm: y, mean, var, dx, dscale, dbias;
pooling: exact), then per op and shape: callgrind instruction counts (deterministic whatever the
load; one run of the op on a smaller copy of the shape) and interleaved wall/CPU timing rounds
(old, base, avx2 in turn; the ratio new/old per round). Raw JSON -> benchmarks/results/native_loops/.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "lightflax", "native", "csrc")
FLAGS = ["-std=c++17", "-O3", "-fPIC", "-Wno-unknown-pragmas", f"-I{HERE}", f"-I{CSRC}"]
P = ctypes.POINTER
F = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
D = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
I64, FL, INT = ctypes.c_int64, ctypes.c_float, ctypes.c_int


def build(out_dir):
    src = os.path.join(HERE, "bench_loops.cc")
    so, exe = os.path.join(out_dir, "bench_loops.so"), os.path.join(out_dir, "bench_loops")
    subprocess.run(["g++", *FLAGS, "-shared", "-o", so, src], check=True)
    subprocess.run(["g++", *FLAGS, "-o", exe, src], check=True)
    lib = ctypes.CDLL(so)
    for v in ("old", "new"):
        getattr(lib, f"{v}_bn_train").argtypes = [F, F, F, FL, INT, I64, I64, F, F, F]
        getattr(lib, f"{v}_bn_bwd").argtypes = [F, F, F, F, F, F, FL, INT, I64, I64, F, F, F]
        getattr(lib, f"{v}_pool_fwd").argtypes = [F, I64, I64, I64, I64, F]
        getattr(lib, f"{v}_pool_bwd").argtypes = [F, F, I64, I64, I64, I64, F]
        getattr(lib, f"{v}_mask").argtypes = [F, F, I64, I64, F, D]
    lib.lfb_set_isa.argtypes, lib.lfb_set_isa.restype = [INT], INT
    return lib, exe


VERSIONS = {"old": ("old", None), "base": ("new", 0), "avx2": ("new", 1)}


def _fn(lib, version, op):
    pre, isa = VERSIONS[version]
    if isa is not None:
        got = lib.lfb_set_isa(isa)
        if got != isa:
            return None  # the CPU lacks AVX2
    return getattr(lib, f"{pre}_{op.replace('_relu', '')}")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if b.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run_op(lib, version, op, arrs):
    """Runs op once; returns its outputs."""
    f = _fn(lib, version, op)
    if f is None:
        return None
    x, g, s, b = arrs["x"], arrs["g"], arrs["scale"], arrs["bias"]
    c = x.shape[-1]
    m = x.size // c
    if op.startswith("bn_train"):
        y, mean, var = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
        f(x, s, b, 1e-3, int(op.endswith("relu")), m, c, y, mean, var)
        return dict(y=y, mean=mean, var=var)
    if op.startswith("bn_bwd"):
        dx, ds, db = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
        f(g, x, arrs["y"], arrs["mean"], arrs["var"], s, 1e-3, int(op.endswith("relu")), m, c, dx, ds, db)
        return dict(dx=dx, dscale=ds, dbias=db)
    n, h, w, _ = x.shape
    if op == "pool_fwd":
        y = np.empty((n, h // 2, w // 2, c), np.float32)
        f(x, n, h, w, c, y)
        return dict(y=y)
    if op == "pool_bwd":
        dx = np.empty_like(x)
        f(x, arrs["gp"], n, h, w, c, dx)
        return dict(dx=dx)
    out, sums = np.empty_like(x), np.empty(c, np.float64)
    f(g, arrs["y"], m, c, out, sums)
    return dict(out=out, db=sums)


def inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    n, h, w, c = shape
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    x[..., 0] = 0.3 if c > 1 else x[..., 0]  # a constant channel
    g = rng.standard_normal(shape).astype(np.float32)
    gp = rng.standard_normal((n, h // 2, w // 2, c)).astype(np.float32)
    xr = np.round(x)  # pooling: many ties
    X = x.astype(np.float64)
    mean = X.mean((0, 1, 2)).astype(np.float32)
    var = X.var((0, 1, 2)).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(c)).astype(np.float32)
    y = np.maximum((x - mean) / np.sqrt(var + 1e-3) * scale + bias, 0).astype(np.float32)
    return dict(x=x, g=g, gp=gp, xr=xr, mean=mean, var=var, scale=scale, bias=bias, y=y)


def reference(op, a):
    """float64 NumPy reference of op on inputs a."""
    X, G = a["x"].astype(np.float64), a["g"].astype(np.float64)
    S, B = a["scale"].astype(np.float64), a["bias"].astype(np.float64)
    relu = op.endswith("relu")
    if op.startswith("bn_train"):
        mu, var = X.mean((0, 1, 2)), X.var((0, 1, 2))
        pre = (X - mu) / np.sqrt(var + np.float64(np.float32(1e-3))) * S + B
        return dict(y=np.maximum(pre, 0) if relu else pre, mean=mu, var=var)
    if op.startswith("bn_bwd"):
        mu, var = a["mean"].astype(np.float64), a["var"].astype(np.float64)
        inv = 1 / np.sqrt(var + np.float64(np.float32(1e-3)))
        xh = (X - mu) * inv
        gg = G * (a["y"] > 0) if relu else G
        return dict(dx=S * inv * (gg - gg.mean((0, 1, 2)) - xh * (gg * xh).mean((0, 1, 2))),
                    dscale=(gg * xh).sum((0, 1, 2)), dbias=gg.sum((0, 1, 2)))
    if op == "mask":
        out = G * (a["y"] > 0)
        return dict(out=out, db=out.sum((0, 1, 2)))
    x = a["x"]
    n, h, w, c = x.shape
    win = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    win = win.reshape(n, h // 2, w // 2, 4, c)
    m = win.max(3)
    if op == "pool_fwd":
        return dict(y=m)
    first = np.argmax(win == m[:, :, :, None], axis=3)  # the first maximum (row-major in the window)
    d = (np.arange(4)[None, None, None, :, None] == first[:, :, :, None]) * a["gp"][:, :, :, None]
    dx = np.zeros(x.shape, np.float64)
    dx[:, : h // 2 * 2, : w // 2 * 2] = d.reshape(n, h // 2, w // 2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        n, h // 2 * 2, w // 2 * 2, c)
    return dict(dx=dx)


OPS = ("bn_train", "bn_train_relu", "bn_bwd", "bn_bwd_relu", "pool_fwd", "pool_bwd", "mask")
TOL = dict(y=1e-5, mean=1e-6, var=1e-5, dx=1e-5, dscale=1e-5, dbias=1e-5, out=0.0, db=1e-6)


def check(lib, shapes):
    """Every version against float64; returns the worst relative error per (op, version)."""
    worst = {}
    for shape in shapes:
        a = inputs(shape, seed=sum(shape))
        for op in OPS:
            if op.startswith("pool"):
                a = dict(a, x=a["xr"])
            want = reference(op, a)
            for version in VERSIONS:
                got = run_op(lib, version, op, a)
                if got is None:
                    continue
                for k, ref in want.items():
                    e = rel(got[k], ref)
                    exact = op.startswith("pool")
                    ok = (np.array_equal(got[k], ref.astype(np.float32)) if exact else e <= TOL[k])
                    if not ok:
                        raise SystemExit(f"{op} {version} {shape} {k}: rel err {e:.2e} > {TOL[k]}")
                    worst[(op, version)] = max(worst.get((op, version), 0.0), e)
    return worst


def layer_shapes(size, batch):
    """The BatchNorm / pooling input shapes of one train step of each study model."""
    conv2d_bn, conv2d_pool, s = [], [], size
    for f in (8, 16, 32):
        for _ in range(3):
            s -= 2
            conv2d_bn.append(((batch, s, s, f), False))
        conv2d_pool.append((batch, s, s, f))
        s //= 2
    light_bn, light_pool, s = [], [], size
    for f in (8, 16, 32):
        light_bn += [((batch, s, s, f), True), ((batch, s, s, f), False), ((batch, s, s, f), False)]
        light_pool.append((batch, s, s, f))
        s //= 2
    return {"xray_conv2d": (conv2d_bn, conv2d_pool), "xray_light": (light_bn, light_pool)}


def timing(lib, model_layers, rounds):
    """Interleaved rounds: per round, each version runs every layer of the op once (the per-step
    total); returns {op: {version: [(wall_ms, cpu_ms) per round]}}."""
    bn, pool = model_layers
    biggest = max(int(np.prod(s)) for s, _ in bn)
    rng = np.random.default_rng(0)
    buf = {k: rng.standard_normal(biggest).astype(np.float32) for k in ("x", "g", "gp", "y")}
    buf["y"] = np.maximum(buf["y"], 0)

    def arrays(shape):
        n, h, w, c = shape
        cut = lambda k, shp: buf[k][: int(np.prod(shp))].reshape(shp)  # noqa: E731
        c_ = shape[-1]
        return dict(x=cut("x", shape), g=cut("g", shape), y=cut("y", shape), gp=cut("gp", (n, h // 2, w // 2, c)),
                    mean=np.zeros(c_, np.float32), var=np.ones(c_, np.float32), scale=np.ones(c_, np.float32),
                    bias=np.zeros(c_, np.float32))

    jobs = {"bn_fwd": [("bn_train_relu" if r else "bn_train", arrays(s)) for s, r in bn],
            "bn_bwd": [("bn_bwd_relu" if r else "bn_bwd", arrays(s)) for s, r in bn],
            "pool_fwd": [("pool_fwd", arrays(s)) for s in pool],
            "pool_bwd": [("pool_bwd", arrays(s)) for s in pool],
            "conv_bwd_mask": [("mask", arrays(s)) for s, _ in bn]}
    versions = [v for v in VERSIONS if _fn(lib, v, "mask") is not None]
    out = {op: {v: [] for v in versions} for op in jobs}
    for r in range(rounds + 1):  # round 0: warm-up, not kept
        for op, calls in jobs.items():
            order = versions[r % len(versions):] + versions[: r % len(versions)]
            for v in order:
                w0, c0 = time.perf_counter(), time.thread_time()
                for name, a in calls:
                    run_op(lib, v, name, a)
                w1, c1 = time.perf_counter(), time.thread_time()
                if r:
                    out[op][v].append((1e3 * (w1 - w0), 1e3 * (c1 - c0)))
    return out


def callgrind(exe, shapes):
    """Instructions (callgrind, deterministic) per op and version, one run on each shape."""
    res = {}
    for shape in shapes:
        for op in OPS:
            for version in VERSIONS:
                with tempfile.TemporaryDirectory() as d:
                    f = os.path.join(d, "cg.out")
                    p = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={f}",
                                        "--toggle-collect=old_*", "--toggle-collect=new_*", exe, op, version,
                                        *map(str, shape)], capture_output=True, text=True)
                    if p.returncode != 0:
                        continue
                    ann = subprocess.run(["callgrind_annotate", f], capture_output=True, text=True).stdout
                    tot = [ln for ln in ann.splitlines() if "PROGRAM TOTALS" in ln]
                    res[f"{op} {version} {'x'.join(map(str, shape))}"] = int(tot[0].split()[0].replace(",", ""))
    return res


def summarize(times):
    rows = {}
    for op, per in times.items():
        old = np.array(per["old"])
        for v, vals in per.items():
            a = np.array(vals)
            ratio = a[:, 0] / old[:, 0]
            rows[f"{op} {v}"] = dict(wall_ms=float(np.median(a[:, 0])), cpu_ms=float(np.median(a[:, 1])),
                                     ratio_wall_median=float(np.median(ratio)),
                                     ratio_wall_10_90=[float(np.percentile(ratio, 10)),
                                                       float(np.percentile(ratio, 90))],
                                     ratio_cpu_median=float(np.median(a[:, 1] / old[:, 1])),
                                     ratio_cpu_10_90=[float(np.percentile(a[:, 1] / old[:, 1], 10)),
                                                      float(np.percentile(a[:, 1] / old[:, 1], 90))])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--check_only", action="store_true")
    ap.add_argument("--no_callgrind", action="store_true")
    args = ap.parse_args(argv)
    if args.size < 16 or args.batch < 1 or args.rounds < 1:
        print("bench_loops: --size must be >= 16, --batch and --rounds >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        lib, exe = build(d)
        shapes = [(2, 7, 9, 8), (3, 5, 4, 16), (2, 6, 6, 32), (1, 4, 4, 64), (2, 5, 7, 5), (3, 3, 5, 24),
                  (1, 1, 3, 8), (4, 9, 11, 3)]
        worst = check(lib, shapes)
        for (op, v), e in sorted(worst.items()):
            print(f"check {op:14s} {v:5s} max rel err {e:.1e}")
        if args.check_only:
            return 0
        rec = dict(command=" ".join(["python", "benchmarks/native_loops/bench_loops.py", *(argv or sys.argv[1:])]),
                   date=datetime.now(timezone.utc).isoformat(timespec="seconds"), cpu=platform.processor(),
                   load_before=os.getloadavg(), check_worst_rel={f"{o} {v}": e for (o, v), e in worst.items()})
        try:
            rec["cpu"] = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln][0]
        except OSError:
            pass
        if not args.no_callgrind:
            rec["callgrind_instructions"] = callgrind(exe, [(2, 158, 158, 8), (2, 71, 71, 16), (2, 29, 29, 32)])
            for k, v in rec["callgrind_instructions"].items():
                print(f"callgrind {k:40s} {v:>12,d}")
        rec["timing"] = {}
        for model, layers_ in layer_shapes(args.size, args.batch).items():
            t = timing(lib, layers_, args.rounds)
            rec["timing"][model] = dict(raw=t, summary=summarize(t))
            for k, s in rec["timing"][model]["summary"].items():
                print(f"{model:12s} {k:20s} wall {s['wall_ms']:7.2f} ms cpu {s['cpu_ms']:7.2f} ms  new/old wall "
                      f"{s['ratio_wall_median']:.3f} ({s['ratio_wall_10_90'][0]:.3f}-{s['ratio_wall_10_90'][1]:.3f}) "
                      f"cpu {s['ratio_cpu_median']:.3f} ({s['ratio_cpu_10_90'][0]:.3f}-{s['ratio_cpu_10_90'][1]:.3f})")
        rec["load_after"] = os.getloadavg()
    out = os.path.join(ROOT, "benchmarks", "results", "native_loops")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{datetime.now(timezone.utc):%Y-%m-%d_%H%M%S}_{args.size}_{args.batch}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    print("raw:", os.path.relpath(path, ROOT))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
