"""Fraction of initialisations whose network is dead at init (constant logits) on real data.

    python benchmarks/dead_init.py fashion_mnist mnist_light 20 1,2,3
    python benchmarks/dead_init.py pneumonia_mnist xray_light 20 1,2

The reference LightConv2D starts its biases glorot-uniform (limit sqrt(3/k) for a
k-vector): with k=1 the single bottleneck channel of a layer can be negative for every
pixel, its ReLU passes nothing, and the whole network below it is constant.
"""
import sys

import jax
import jax.numpy as jnp

from lightflax import data as data_lib, models

d = data_lib.load(sys.argv[1])
model_name, seeds = sys.argv[2], int(sys.argv[3])
x = jnp.asarray(d.splits["train"].images[:512], jnp.float32) / 255.0
channels = models.info(model_name).input_shape[-1]
if x.shape[-1] != channels:  # grey -> RGB, as the trainer does
    x = jnp.repeat(x, channels, axis=-1)
for k in [int(v) for v in sys.argv[4].split(",")]:
    m = models.create(model_name, k=k, num_classes=d.num_classes)
    dead = []
    for s in range(seeds):
        v = m.init(jax.random.key(s), x[:1], train=False)  # the trainer's init key for --seed=s
        logits, _ = m.apply(v, x, train=True, mutable=["batch_stats"])
        if float(jnp.std(logits, axis=0).max()) < 1e-6:
            dead.append(s)
    print(f"{model_name} k={k}: {len(dead)}/{seeds} initialisations dead at init (constant logits on "
          f"{x.shape[0]} real images); dead seeds: {dead}", flush=True)
