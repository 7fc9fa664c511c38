"""Native (oneDNN) vs XLA depthwise convolutions: EfficientNet-Lite0 feature extraction on CPU.

    python benchmarks/bench_depthwise.py [--batch=32] [--rounds=3]

The transfer arm's one-off cost is the frozen backbone's forward pass over every image; its
depthwise convolutions run on XLA:CPU's grouped convolution at ~0.3-0.8 GFLOP/s. This compiles
the backbone's pixels -> features function twice (native kernels active / `--kernels=xla`),
checks that both give the same features (max relative difference printed), and times them
with the one harness (`lightflax.timing.measure_interleaved`: A B A B ..., synchronised,
warm-up excluded, median and p10/p90, XLA's FLOP count), printing images per second, the
ratio and which native kernels ran. Process CPU time is printed next to wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lightflax import native, pretrained, timing  # noqa: E402
from lightflax.pretrained.backbone import preprocess_images  # noqa: E402
from lightflax.tables import markdown_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not native.available():
        print(f"native kernels unavailable: {native.status()['reason']}", file=sys.stderr)
        return 1
    bb = pretrained.load("efficientnet_lite0", include_top=False)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 28, 28, 1), dtype=np.uint8)
    x = jnp.asarray(images)
    variants, outs = [], {}
    for name in ("native", "xla"):
        # a fresh jit per variant: the kernel switch is read when the function is traced
        fn = jax.jit(lambda v, x: bb.module.apply(
            v, preprocess_images(x, resolution=bb.resolution, offset=bb.offset, scale=bb.scale), train=False))
        with native.kernels(name):
            compiled = timing.aot_compile(fn, bb.variables, x)
        outs[name] = np.asarray(compiled.compiled(bb.variables, x))
        variants.append(timing.Variant(name, compiled, (bb.variables, x), info={"batch": args.batch}))
    diff = float(np.max(np.abs(outs["native"] - outs["xla"])) / np.max(np.abs(outs["xla"])))
    native.reset_call_counts()
    c0, t0 = time.process_time(), time.perf_counter()
    rows = timing.measure_interleaved(variants, rounds=args.rounds, warmup=1, baseline="xla")
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    print(markdown_table(["kernels", "median ms/batch", "p10-p90 ms", "images/s", "GFLOP/s", "ratio to xla"],
                         [[r["variant"], f"{r['median_ms']:.0f}", f"{r['p10_ms']:.0f}-{r['p90_ms']:.0f}",
                           f"{r['images_per_s']:.1f}", f"{r['achieved_gflops_per_s']:.2f}",
                           f"{r['ratio_to_baseline']:.3f}"] for r in rows]))
    print(f"batch {args.batch} at {bb.resolution} px (images resized from 28 px); features max relative difference "
          f"native vs xla {diff:.2e}; timed section {wall:.1f} s wall, {cpu:.1f} s process CPU; native calls "
          f"{ {k: v for k, v in native.call_counts().items() if v} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
