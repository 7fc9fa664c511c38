"""Why 1 vs 8 devices can disagree at 1e-3 on cifar_separable: the step is ill-conditioned (docs/native.md).

    python benchmarks/native_conditioning.py     # ~3 min on 2 cores; 8 simulated CPU devices

Trains tests/test_train.py's cifar_separable setting (24², batch 64, SGD 0.01, momentum 0.9) for one step
with XLA's kernels, then, at the state reached, computes the gradient of the next batch in float64 (XLA,
jax_enable_x64) and in float32 with XLA's and the native kernels on 1 and 8 devices, and with every
parameter moved by one ulp (nextafter). Prints each gradient's max deviation from float64 and between
each other, relative to the largest float64 gradient. A well-conditioned step moves by ~1e-6 for a 1-ulp
change; a step that sits on a near-tie (a ReLU input or max-pool window within rounding of a kink) jumps.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_enable_x64", True)

from lightflax import data as data_lib, models, native, parallel, steps, train  # noqa: E402
from lightflax.config import RunConfig  # noqa: E402

MODEL, SIZE, BATCH = os.environ.get("MODEL", "cifar_separable"), 24, 64


def main():
    d = data_lib.load("synthetic", synthetic_shape=(20, 20, 1), synthetic_sizes={"train": 256, "val": 16, "test": 16},
                      num_classes=2, seed=0)
    cfg = RunConfig.flat(workdir="unused", model=MODEL, batch_size=BATCH, image_size=SIZE, channels=3, l2=1e-4,
                    optimizer="sgd", learning_rate=0.01, seed=0)
    with native.kernels("xla"):
        tr = train.Trainer(cfg, d, devices=jax.devices()[:1])
        state = tr.init_state()
        images, labels = tr.device_split("train")
        perm = tr.permutations(0)
        state, _ = tr.train_step(state, images, labels, perm, tr.data_keys(), tr.dev_ids)
    idx = np.asarray(perm)[0][BATCH:2 * BATCH]  # the second batch of the epoch
    # host (NumPy) values: the state lives on device 0, the 8-device runs need uncommitted inputs
    x = np.asarray(steps.preprocess(jnp.asarray(np.asarray(images)[idx]), SIZE, cfg))
    y = np.asarray(labels)[idx]
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], {"params": state.params,
                                                                     "batch_stats": state.batch_stats})
    model = models.create(MODEL, num_classes=2, bn_axis_name=parallel.AXIS)

    def grad(kern, nd, dtype, nudge=False):
        v = jax.tree_util.tree_map(lambda a: a.astype(dtype), variables)
        if nudge:
            v = jax.tree_util.tree_map(lambda a: np.nextafter(a, np.asarray(np.inf, a.dtype)), v)

        def f(p, bs, x, y):
            def loss(p):
                logits, _ = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
                return jnp.mean(steps.cross_entropy(logits, y).astype(dtype))
            return jax.lax.pmean(jax.grad(loss)(p), parallel.AXIS)

        with native.kernels(kern):
            fn = jax.jit(jax.shard_map(f, mesh=parallel.make_mesh(jax.devices()[:nd]), check_vma=False,
                                       in_specs=(P(), P(), P(parallel.AXIS), P(parallel.AXIS)), out_specs=P()))
            g = fn(v["params"], v["batch_stats"], x.astype(dtype), y)
        return [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(g)]

    ref = grad("xla", 1, jnp.float64)
    top = max(float(np.max(np.abs(a))) for a in ref)
    dist = lambda a, b: max(float(np.max(np.abs(u - w))) for u, w in zip(a, b)) / top  # noqa: E731
    runs = {"xla 1 dev": grad("xla", 1, jnp.float32), "xla 8 dev": grad("xla", 8, jnp.float32),
            "xla 1 dev, params +1 ulp": grad("xla", 1, jnp.float32, nudge=True)}
    if native.available():
        runs.update({"native 1 dev": grad("native", 1, jnp.float32), "native 8 dev": grad("native", 8, jnp.float32),
                     "native 1 dev, params +1 ulp": grad("native", 1, jnp.float32, nudge=True)})
    print(f"# {MODEL} {SIZE}² batch {BATCH}: gradient of batch 2 after one SGD step; max |diff| / max |float64 grad|")
    for name, g in runs.items():
        print(f"{name:28s} vs float64 {dist(g, ref):.1e}   " + "  ".join(
            f"vs {other} {dist(g, h):.1e}" for other, h in runs.items() if other < name))


if __name__ == "__main__":
    main()
