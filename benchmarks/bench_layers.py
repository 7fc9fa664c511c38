"""Layer benchmark for the default-impl decision (issue: layers).

    python benchmarks/bench_layers.py                      # batch 64, 299x299x3 -> 8, k = 1..5
    python benchmarks/bench_layers.py --size=128 --rounds=5 --csv=layers.csv

Forward and forward+backward time of LightConv2D (impl conv and einsum),
LowRankConv2D (materialised) and Conv2D at the X-ray model's first-block sizes,
compiled ahead of time and measured in interleaved rounds (lightflax.speed);
ratios are to Conv2D, per round, median.
"""

import argparse
import time


import jax

from lightflax import speed, timing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--ks", default="1,2,3,4,5")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} backend={jax.default_backend()} "
          f"device={jax.devices()[0].device_kind} batch={args.batch} size={args.size} "
          f"c_in={args.channels} c_out={args.features} rounds={args.rounds}", flush=True)
    rows = []
    for mode in args.modes.split(","):
        group = [speed.layer_variant("conv2d", mode, batch=args.batch, size=args.size, c_in=args.channels,
                                     c_out=args.features, k=1)]
        for k in (int(v) for v in args.ks.split(",")):
            for kind in ("light_conv", "light_einsum", "lowrank"):
                group.append(speed.layer_variant(kind, mode, batch=args.batch, size=args.size,
                                                 c_in=args.channels, c_out=args.features, k=k))
        rows += timing.measure_interleaved(group, rounds=args.rounds, baseline="conv2d")
    print(speed.markdown(rows, ["variant", "mode", "median_ms", "p10_ms", "p90_ms", "ratio_to_baseline",
                                "compile_s", "gflops", "gbytes", "achieved_gflops_per_s"]))
    if args.csv:
        speed.write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
