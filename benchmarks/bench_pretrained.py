"""Feature-extraction throughput of the pretrained backbones (issue: pretrained).

    python benchmarks/bench_pretrained.py                          # batch 8, 5 rounds, both backbones
    python benchmarks/bench_pretrained.py --keras                  # + Keras 3 InceptionV3 (JAX backend)
    python benchmarks/bench_pretrained.py --batch=32 --rounds=3 --backbones=inception_v3

Times the jitted forward from uint8 pixels to pooled features (resize +
normalise + backbone, one XLA program: what features.extract_cached runs) at
the backbone's resolution. Compilation is timed on its own; each round is one
batch, synchronised with block_until_ready; reported: median and best ms per
batch and images/s from the median. Weights: the real ones when found, else a
random init (speed does not depend on the values; the row says which).
Keras: ``model.predict_on_batch`` of keras.applications.InceptionV3(weights=None,
include_top=False, pooling='avg') at 299x299, first call excluded.
"""

import argparse
import os
import statistics
import time


import jax
import jax.numpy as jnp
import numpy as np

from lightflax import pretrained, timing
from lightflax.errors import CheckpointError
from lightflax.pretrained import backbone as bbmod


def _backbone(name: str):
    try:
        return pretrained.load(name), "real"
    except CheckpointError:
        arch = pretrained._arch(name)
        module = pretrained.build(name)
        x = jnp.zeros((1, arch.RESOLUTION, arch.RESOLUTION, 3), jnp.float32)
        variables = jax.jit(lambda k: module.init(k, x, train=False))(jax.random.key(0))
        return bbmod.Backbone(name=name, module=module, variables=variables, resolution=arch.RESOLUTION,
                              feature_dim=arch.FEATURE_DIM, include_top=False, offset=arch.OFFSET,
                              scale=arch.SCALE), "random init"


def _time(fn, rounds: int):
    """(first call s, [measured call s]) through the trainer's StepTimer (the first call compiles)."""
    timer = timing.StepTimer(warmup=1)
    for _ in range(rounds + 1):
        timer.run(fn)
    return timer.durations[0], timer.measured


def _row(label, weights, batch, res, first, times):
    med = statistics.median(times)
    return (f"| {label} | {weights} | {batch} | {res} | {first:.1f} | {1e3 * med:.0f} | "
            f"{1e3 * min(times):.0f} | {batch / med:.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--input_size", type=int, default=28, help="side of the uint8 input images (resized)")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--backbones", default="inception_v3,efficientnet_lite0")
    ap.add_argument("--keras", action="store_true", help="also time Keras 3 InceptionV3 (JAX backend)")
    args = ap.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} backend={jax.default_backend()} "
          f"device={jax.devices()[0].device_kind} cpus={os.cpu_count()} batch={args.batch} "
          f"rounds={args.rounds} input={args.input_size}x{args.input_size}x{args.channels} uint8", flush=True)
    print("| model | weights | batch | res | first call s (compile+run) | median ms/batch | best ms | img/s |")
    print("|---|---|---|---|---|---|---|---|")
    images = jnp.asarray(np.random.default_rng(0).integers(
        0, 256, (args.batch, args.input_size, args.input_size, args.channels), dtype=np.uint8))
    for name in args.backbones.split(","):
        bb, weights = _backbone(name)
        fn = bb.features_from_pixels
        first, times = _time(lambda: fn(bb.variables, images), args.rounds)
        print(_row(f"lightflax {name}", weights, args.batch, bb.resolution, first, times), flush=True)
    if args.keras:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras

        model = keras.applications.InceptionV3(weights=None, include_top=False, pooling="avg",
                                               input_shape=(299, 299, 3))
        x = np.random.default_rng(0).uniform(-1, 1, (args.batch, 299, 299, 3)).astype(np.float32)
        first, times = _time(lambda: model.predict_on_batch(x), args.rounds)
        print(_row(f"keras {keras.__version__} InceptionV3 ({keras.backend.backend()})", "random init",
                   args.batch, 299, first, times), flush=True)


if __name__ == "__main__":
    main()
