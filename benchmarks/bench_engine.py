"""Engine measurements, side by side (interleaved rounds, lightflax.speed):

    python benchmarks/bench_engine.py seeds    # 3 replicas per step (vmap, loop) vs one replica
    MODEL=mnist_light K=5 SEEDS=3 python benchmarks/bench_engine.py seeds
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_engine.py parallel  # pmap vs shard_map
"""

import os
import sys
import time


import jax

from lightflax import speed, timing
from lightflax.config import RunConfig


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "seeds"
    size = int(os.environ.get("SIZE", "28"))
    batch = int(os.environ.get("BATCH", "64"))
    rounds = int(os.environ.get("ROUNDS", "5"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} devices={jax.device_count()} size={size} "
          f"batch={batch} rounds={rounds}")
    if what == "seeds":
        # One replica, then 3 replicas in one step: vmapped (grouped convolutions) and
        # looped (plain convolutions, one replica after the other, unrolled).
        n = int(os.environ.get("SEEDS", "3"))
        model, kw = os.environ.get("MODEL", "xray_light"), {"k": int(os.environ.get("K", "5"))}
        if "light" not in model:
            kw = {}
        group = [speed.model_variant(model, kw, batch=batch, size=size)] + [
            speed.model_variant(model, kw, batch=batch, size=size, num_seeds=n, replica_mode=m)
            for m in ("vmap", "loop")]
        rows = timing.measure_interleaved(group, rounds=rounds)
        print(speed.markdown(rows, ["variant", "median_ms", "p10_ms", "p90_ms", "ratio_to_baseline", "compile_s"]))
        for row in rows[1:]:
            print(f"{row['variant']}: {row['median_ms']:.1f} ms vs {n} sequential steps "
                  f"{n * rows[0]['median_ms']:.1f} ms -> throughput x{n / row['ratio_to_baseline']:.2f} "
                  f"(from the per-round ratio {row['ratio_to_baseline']:.3f})")
    elif what == "input":
        # The device-resident input path (gather from N stored uint8 grayscale images +
        # gray->RGB + /255 inside the step) vs the same step fed one batch that is
        # already preprocessed on the device.
        import dataclasses

        import numpy as np

        from lightflax import data as data_lib, train

        rows_all = []
        for model, kw in (("xray_light", {"k": 5}), ("xray_conv2d", {})):
            variants = []
            for fed in ("device_resident", "preprocessed_batch"):
                d = data_lib.load("synthetic", synthetic_shape=(size, size, 1),
                                  synthetic_sizes={"train": 1024, "val": batch, "test": batch}, num_classes=2)
                if fed == "preprocessed_batch":
                    tr0 = d.splits["train"]
                    x = np.repeat(tr0.images[:batch].astype(np.float32) / 255.0, 3, axis=-1)
                    d = dataclasses.replace(d, splits=dict(d.splits, train=dataclasses.replace(
                        tr0, images=x, labels=tr0.labels[:batch])))
                cfg = RunConfig.flat(workdir="", model=model, model_kwargs=kw, batch_size=batch, image_size=size,
                                      channels=3)
                trn = train.Trainer(cfg, d)
                state, keys = trn.init_state(), trn.data_keys()
                images, labels = trn.device_split("train")
                perm = trn.permutations(0)
                c = timing.aot_compile(trn, state, images, labels, perm, keys)
                variants.append(timing.Variant(f"{model} {fed}", c, (state, images, labels, perm, keys, trn.dev_ids),
                                              next_args=lambda out, a: (out[0],) + tuple(a[1:]),
                                              info={"batch": batch, "size": size}))
            rows_all += timing.measure_interleaved(variants, rounds=rounds, baseline=variants[1].name)
        print(speed.markdown(rows_all, ["variant", "median_ms", "p10_ms", "p90_ms", "ratio_to_baseline"]))
    else:
        group = [speed.model_variant("xray_light", {"k": 5}, batch=batch, size=size, parallel=p)
                 for p in ("shard_map", "pmap")]
        rows = timing.measure_interleaved(group, rounds=rounds)
        print(speed.markdown(rows, ["variant", "devices", "median_ms", "p10_ms", "p90_ms", "ratio_to_baseline",
                                    "compile_s"]))


if __name__ == "__main__":
    main()
