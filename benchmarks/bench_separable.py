"""SeparableConv2D's depthwise part: XLA's fused taps vs the native depthwise kernel (forward and
backward), the whole train step of a separable model, interleaved in one process.

    python benchmarks/bench_separable.py cifar_separable 32 64
    python benchmarks/bench_separable.py mnist_separable 28 64

Both variants use the native convolution/BatchNorm/pooling kernels; only
the models' ``depthwise_native`` (``SeparableConv2D(depthwise_native=...)``) differs. 8 rounds, the first two
excluded; median ms per step, the median per-round ratio, and the last native step's calls.
"""

import sys
import time

import numpy as np

from lightflax import native, speed, timing


def main(model="cifar_separable", size="32", batch="64"):
    size, batch = int(size), int(batch)
    variants = {}
    for flag in (False, True):
        v = speed.model_variant(model, {"depthwise_native": flag}, batch=batch, size=size)
        variants[flag] = [v, v.args]
    times, calls = {False: [], True: []}, None
    for r in range(8):
        for flag in (False, True):
            v, args = variants[flag]
            native.reset_call_counts()
            t = time.perf_counter()
            out = timing.sync(v.compiled.compiled(*args))
            dt = time.perf_counter() - t
            variants[flag][1] = v.next_args(out, args)
            if r >= 2:
                times[flag].append(dt)
            if flag:
                calls = {k: n for k, n in native.call_counts().items() if n}
    ratio = np.median(np.array(times[False]) / np.array(times[True]))
    print(f"{model} {size}² b{batch}: taps {1e3 * np.median(times[False]):.1f} ms, native depthwise "
          f"{1e3 * np.median(times[True]):.1f} ms, taps / native {ratio:.2f}x; native calls {calls}")


if __name__ == "__main__":
    main(*sys.argv[1:])
