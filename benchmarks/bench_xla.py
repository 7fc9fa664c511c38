"""XLA:CPU speed work, reproducible with one command each (docs/speed.md, "Train-step speed on XLA:CPU").

    python benchmarks/bench_xla.py flags     # the trainer's step under XLA option variants, interleaved
    python benchmarks/bench_xla.py paradox   # static cost of the compiled step: FLOPs, bytes, kernels, convs
    python benchmarks/bench_xla.py dtype     # float32 vs bfloat16 compute, interleaved
    python benchmarks/bench_xla.py separable # SeparableConv2D models: grouped conv vs fused depthwise taps

Environment: SIZES (128), BATCH (64), ROUNDS (4), MODELS (xray_conv2d,xray_light:5,xray_lowrank:5).

``flags`` compiles every variant in ONE process with per-compilation
``compiler_options`` (lightflax's XLA_FLAGS default applies to the process; a
variant's options override it for that compilation only), so the ratios are
measured side by side: "jax default" restores jaxlib 0.10.2's own YNNPACK
fusion list, "lightflax default" is ``xla_defaults.CPU_FLAGS``.
"""

import os
import re
import sys
import time


from lightflax import speed, timing, xla_defaults

SIZES = [int(s) for s in os.environ.get("SIZES", "128").split(",")]
BATCH = int(os.environ.get("BATCH", "64"))
ROUNDS = int(os.environ.get("ROUNDS", "4"))
MODELS = os.environ.get("MODELS", "xray_conv2d,xray_light:5,xray_lowrank:5").split(",")

YNN = "xla_cpu_experimental_ynn_fusion_type"
FLAG_VARIANTS = {
    "jax default": {YNN: "dot,eltwise,reduce,individual_dot,individual_convolution"},
    "no YNN convolutions": {YNN: "dot,eltwise,reduce,individual_dot"},
    "lightflax default": dict(xla_defaults.CPU_FLAGS),
    "YNN off": {YNN: ""},
    "no YNN reduce": {YNN: "dot,individual_dot"},
}


def _options(opts):
    """XLA_FLAGS spelling -> compiler_options spelling (the enum list takes LIBRARY_FUSION_TYPE_* names)."""
    out = dict(opts)
    if YNN in out:
        out[YNN] = ",".join(f"LIBRARY_FUSION_TYPE_{t.strip().upper()}" for t in out[YNN].split(",") if t.strip())
    return out


def _model(spec):
    name, _, k = spec.partition(":")
    return name, ({"k": int(k)} if k else {})


def _header(what):
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} bench_xla {what} sizes={SIZES} batch={BATCH} "
          f"rounds={ROUNDS} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)


TIME_COLUMNS = ["variant", "median_ms", "p10_ms", "p90_ms", "ratio_to_baseline", "compile_s"]


def _measure(group, columns=TIME_COLUMNS, extra=None):
    """Interleaved rounds over ``group``; ``extra(row, variant)`` adds columns; prints markdown."""
    rows = timing.measure_interleaved(group, rounds=ROUNDS)
    if extra:
        for row, v in zip(rows, group):
            extra(row, v)
    print(speed.markdown(rows, columns), flush=True)


def flags_mode():
    _header("flags")
    for size in SIZES:
        for spec in MODELS:
            model, kw = _model(spec)
            group = [speed.model_variant(model, kw, batch=BATCH, size=size, compiler_options=_options(opts),
                                         label=f"{spec} {size} {label}")
                     for label, opts in FLAG_VARIANTS.items()]
            # ynn_fusions: evidence that the option took effect
            _measure(group, TIME_COLUMNS + ["gflops", "gbytes", "ynn_fusions"],
                     extra=lambda row, v: row.update(ynn_fusions=v.compiled.compiled.as_text().count("__ynn_fusion")))


def _hlo_counts(text):
    """(instructions that run code, convolution instructions) in the ENTRY computation."""
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    lines = [ln for ln in entry.splitlines()[1:] if "=" in ln]
    passive = re.compile(r"= \S+ (parameter|constant|get-tuple-element|tuple|bitcast)\(")
    kernels = [ln for ln in lines if not passive.search(ln)]
    convs = [ln for ln in lines if re.search(r"\bconvolution\(", ln)]
    return len(kernels), len(convs), text.count("convolution(")


def paradox_mode():
    _header("paradox")
    from lightflax import param_counts

    print("| model | size | params | GFLOP/step | GB accessed/step | FLOP/byte | kernels (entry) | "
          "convolutions (entry) | convolutions (all computations) | temp MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in SIZES:
        for spec in MODELS:
            model, kw = _model(spec)
            v = speed.model_variant(model, kw, batch=BATCH, size=size)
            c = v.compiled
            kernels, convs, convs_all = _hlo_counts(c.compiled.as_text())
            state = v.args[0]
            params = param_counts.variables_counts({"params": state.params, "batch_stats": state.batch_stats})
            temp = (c.memory or {}).get("temp_bytes") or 0
            print(f"| {spec} | {size} | {params['total']:,} | {c.flops / 1e9:.1f} | {c.bytes_accessed / 1e9:.2f} | "
                  f"{c.flops / max(c.bytes_accessed, 1):.2f} | {kernels} | {convs} | {convs_all} | "
                  f"{temp / 2**20:.0f} |", flush=True)


def dtype_mode():
    _header("dtype")
    for size in SIZES:
        for spec in MODELS:
            model, kw = _model(spec)
            _measure([speed.model_variant(model, kw, batch=BATCH, size=size, dtype=d) for d in ("float32", "bfloat16")])


def separable_mode():
    _header("separable")
    for model, channels, size in (("mnist_separable", 1, 28), ("cifar_separable", 3, 32)):
        _measure([speed.model_variant(model, kw, batch=BATCH, size=size, channels=channels, num_classes=10,
                                      label=f"{model} {label}")
                  for label, kw in (("grouped conv (impl=conv)", {"impl": "conv"}), ("depthwise taps (default)", {}))])


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "flags"
    modes = {"flags": flags_mode, "paradox": paradox_mode, "dtype": dtype_mode, "separable": separable_mode}
    if what not in modes:
        raise SystemExit(f"unknown mode {what!r}: use one of {', '.join(modes)}")
    modes[what]()
