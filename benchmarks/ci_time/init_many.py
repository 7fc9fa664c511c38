"""The Trainer's init for several models in ONE process, as test_native's step comparisons do it:
the jitted init (one compilation per model) against op by op (whose per-operation compilations
are shared between models).

    python benchmarks/ci_time/init_many.py --mode=jit      # Trainer._stacked_state, as the trainer runs it
    python benchmarks/ci_time/init_many.py --mode=eager    # the same states, op by op

Prints one JSON line: the mode, the seconds and process CPU seconds of every model's init, and the
totals. No persistent compilation cache (unset JAX_COMPILATION_CACHE_DIR), XLA's optimisations on.
Run the two modes in alternation, in fresh processes, several times.
"""

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

CASES = [("xray_conv2d", {}, 1, 52), *[("xray_light", {"k": k}, 1, 32) for k in (1, 2, 3, 4, 5)],
         ("xray_conv2d", {}, 2, 52)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("jit", "eager"), required=True)
    a = p.parse_args()
    import jax
    import jax.numpy as jnp

    from lightflax import data, steps, train
    from lightflax.config import RunConfig

    out = []
    for model, kw, seeds, size in CASES:
        d = data.load("synthetic", synthetic_shape=(size, size, 3), synthetic_sizes={"train": 16, "val": 8, "test": 8},
                      num_classes=2, seed=0)
        cfg = RunConfig.flat(workdir="unused", model=model, model_kwargs=kw, batch_size=16, image_size=size,
                             channels=3, optimizer="sgd", learning_rate=0.01, num_seeds=seeds)
        tr = train.Trainer(cfg, d)
        t, c = time.perf_counter(), time.process_time()
        if a.mode == "jit":
            state = tr._stacked_state()
        else:
            create = functools.partial(steps.create_state, tr.model, tr.tx, input_shape=(1, *tr.input_shape))
            states = [create(jax.random.key(int(s))) for s in tr.seeds]
            state = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
        jax.block_until_ready(state)
        out.append({"model": model, **kw, "seeds": seeds, "s": round(time.perf_counter() - t, 2),
                    "cpu_s": round(time.process_time() - c, 2)})
    print(json.dumps({"mode": a.mode, "total_s": round(sum(r["s"] for r in out), 2),
                      "total_cpu_s": round(sum(r["cpu_s"] for r in out), 2), "inits": out}))


if __name__ == "__main__":
    main()
