"""Engine measurements, side by side (interleaved rounds, lightflax.speed):

    python benchmarks/bench_engine.py seeds    # N vmapped replicas vs one replica (throughput ratio)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_engine.py parallel  # pmap vs shard_map
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from lightflax import speed  # noqa: E402


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "seeds"
    size = int(os.environ.get("SIZE", "28"))
    batch = int(os.environ.get("BATCH", "64"))
    rounds = int(os.environ.get("ROUNDS", "5"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} devices={jax.device_count()} size={size} "
          f"batch={batch} rounds={rounds}")
    if what == "seeds":
        group = [speed.model_variant("xray_light", {"k": 5}, batch=batch, size=size, num_seeds=n) for n in (1, 3)]
        rows = speed.measure_group(group, rounds=rounds)
        t1, t3 = rows[0]["median_ms"], rows[1]["median_ms"]
        print(speed.markdown(rows, ["variant", "median_ms", "p10_ms", "p90_ms", "ratio_to_baseline", "compile_s"]))
        print(f"3 replicas in one vmapped step: {t3:.1f} ms vs 3 sequential steps {3 * t1:.1f} ms -> "
              f"throughput x{3 * t1 / t3:.2f} (ratio of per-round medians: 3 / {rows[1]['ratio_to_baseline']:.3f})")
    else:
        group = [speed.model_variant("xray_light", {"k": 5}, batch=batch, size=size, parallel=p)
                 for p in ("shard_map", "pmap")]
        rows = speed.measure_group(group, rounds=rounds)
        print(speed.markdown(rows, ["variant", "devices", "median_ms", "p10_ms", "p90_ms", "ratio_to_baseline",
                                    "compile_s"]))


if __name__ == "__main__":
    main()
