"""CPU time of a model's initialisation at a run's start: bucketed uniform draws vs one compile per shape.

    python benchmarks/init_time.py [MODEL ...]      # default: xray_light (K=5, 28 px) and xray_conv2d (64 px)

Each measurement runs in a fresh process (JAX caches compiled programs in memory, so a second
init in one process would cost nothing): `model.init` eager, as the trainer calls it, with
`lightflax.layers.uniform` (one compiled Threefry sampler per power-of-two bucket of sizes) and
with `jax.random.uniform` itself (one compiled sampler per parameter shape, the old path); the
two must give the same parameters bit for bit (checked here, and in tests/test_layers.py).
A/B pairs are interleaved (A B A B ...); the median of process CPU seconds is reported with
the spread, and no persistent compilation cache is used.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from lightflax import models
from lightflax.layers import initializers
name, path = sys.argv[1], sys.argv[2]
if path == "per_shape":  # glorot_uniform reads initializers.uniform when called
    initializers.uniform = lambda key, shape, dtype, lo, hi: jax.random.uniform(key, shape, dtype, lo, hi)
m = models.create(name, num_classes=2, **({"k": 5} if "light" in name else {}))
shape = (1, 28, 28, 1) if "light" in name else (1, 64, 64, 1)
t0 = time.process_time()
v = jax.block_until_ready(m.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False))
cpu = time.process_time() - t0
digest = float(sum(np.sum(np.asarray(x, np.float64) * (i + 1)) for i, x in enumerate(jax.tree_util.tree_leaves(v))))
print(json.dumps({"cpu_s": cpu, "digest": digest}))
"""


def one(model: str, path: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", CHILD, model, path], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv) -> int:
    names = argv or ["xray_light", "xray_conv2d"]
    rounds = 3
    for name in names:
        runs = {"bucketed": [], "per_shape": []}
        for _ in range(rounds):
            for path in runs:
                runs[path].append(one(name, path))
        digests = {r["digest"] for rs in runs.values() for r in rs}
        med = {p: statistics.median(r["cpu_s"] for r in rs) for p, rs in runs.items()}
        spread = {p: (min(r["cpu_s"] for r in rs), max(r["cpu_s"] for r in rs)) for p, rs in runs.items()}
        print(f"{name}: init CPU s, median of {rounds} (min-max): bucketed {med['bucketed']:.2f} "
              f"({spread['bucketed'][0]:.2f}-{spread['bucketed'][1]:.2f}), per shape {med['per_shape']:.2f} "
              f"({spread['per_shape'][0]:.2f}-{spread['per_shape'][1]:.2f}), ratio "
              f"{med['per_shape'] / med['bucketed']:.1f}x; parameters identical: {len(digests) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
