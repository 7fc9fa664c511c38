"""--mixup (lightflax.data.mixup): mixed inputs and soft labels against NumPy, the Beta weight's
moments, the soft-label loss and its gradient, the train step's loss, and the option's validation."""

import numpy as np
import pytest


def _np_logp(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _mixed(key, x, y, alpha=0.4, classes=3):
    """What the train step does: mixup_params from the key, then mix_inputs and mix_labels."""
    import jax.numpy as jnp

    from lightflax.data import mixup

    lam, perm = mixup.mixup_params(key, len(y), alpha)
    return mixup.mix_inputs(jnp.asarray(x), lam, perm), mixup.mix_labels(jnp.asarray(y), lam, perm, classes)


def test_mixup_for_a_fixed_key_against_numpy():
    import jax
    import jax.numpy as jnp

    from lightflax.data import mixup

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(12, 5, 4, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=12).astype(np.int32)
    key = jax.random.key(7)
    lam, perm = mixup.mixup_params(key, 12, 0.4)
    lam, perm = float(lam), np.asarray(perm)
    assert 0.0 < lam < 1.0
    assert sorted(perm.tolist()) == list(range(12)) and (perm != np.arange(12)).any()
    got_x, got_t = _mixed(key, x, y)
    lam64 = np.float64(np.float32(lam))
    want_x = lam64 * x.astype(np.float64) + (1 - lam64) * x.astype(np.float64)[perm]
    eye = np.eye(3)
    want_t = lam64 * eye[y] + (1 - lam64) * eye[y[perm]]
    np.testing.assert_allclose(np.asarray(got_x, np.float64), want_x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got_t, np.float64), want_t, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got_t).sum(-1), 1.0, rtol=1e-6)
    assert got_x.dtype == jnp.float32
    # the same key gives the same mixture; another key another one
    again_x, _ = _mixed(key, x, y)
    np.testing.assert_array_equal(np.asarray(again_x), np.asarray(got_x))
    other_x, _ = _mixed(jax.random.key(8), x, y)
    assert not np.allclose(np.asarray(other_x), np.asarray(got_x))


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_weight_is_beta_alpha_alpha(alpha):
    """Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) (a Beta(a, 1) or a uniform draw fails one)."""
    import jax

    from lightflax.data import mixup

    keys = jax.random.split(jax.random.key(0), 20000)
    lam = np.asarray(jax.vmap(lambda k: mixup.mixup_params(k, 4, alpha)[0])(keys), np.float64)
    assert lam.min() >= 0.0 and lam.max() <= 1.0
    assert lam.mean() == pytest.approx(0.5, abs=0.01)
    assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)


@pytest.mark.parametrize("weighted", [False, True])
def test_soft_cross_entropy_and_gradient_against_float64_reference(weighted):
    import jax
    import jax.numpy as jnp

    from lightflax import steps
    from lightflax.data import mixup

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(10, 3)) * 3
    t = rng.dirichlet(np.ones(3), size=10)
    w = np.array([0.5, 2.0, 1.25]) if weighted else np.ones(3)
    logp = _np_logp(logits)
    ref = np.mean(-(t * w * logp).sum(-1))
    tw = t * w
    ref_grad = (tw.sum(-1, keepdims=True) * np.exp(logp) - tw) / 10
    f = lambda lg: jnp.mean(mixup.soft_cross_entropy(  # noqa: E731
        lg, jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32) if weighted else None))
    lg32 = jnp.asarray(logits, jnp.float32)
    assert float(f(lg32)) == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(f)(lg32)), ref_grad, rtol=1e-4, atol=1e-6)
    # one-hot targets: the (weighted) integer-label cross-entropy of the steps
    y = rng.integers(0, 3, size=10)
    hard = mixup.soft_cross_entropy(lg32, jnp.asarray(np.eye(3)[y], jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(float(jnp.mean(hard)), float(steps.weighted_cross_entropy(
        lg32, jnp.asarray(y), jnp.asarray(w, jnp.float32))), rtol=1e-6)


def test_train_step_trains_on_the_mixed_batch():
    """The step's loss with --mixup equals the float64 soft-label reference computed from the model's
    own logits on the batch mixed with the step's key (and differs from the unmixed loss)."""
    import jax
    import jax.numpy as jnp

    from lightflax import data, models, parallel, steps
    from lightflax.config import RunConfig
    from lightflax.data import mixup

    d = data.load("synthetic", synthetic_shape=(28, 28, 1), synthetic_sizes={"train": 32, "val": 8, "test": 8},
                  num_classes=2)
    images, labels = np.asarray(d.splits["train"].images), np.asarray(d.splits["train"].labels, np.int32)
    cfg = RunConfig.flat(workdir="unused", model="xray_light", model_kwargs={"k": 2}, batch_size=16, image_size=28,
                         shuffle=False, mixup=0.4)
    model = models.create("xray_light", num_classes=2, bn_axis_name=parallel.AXIS, k=2)
    state = steps.create_state(model, steps.make_optimizer(1e-3), jax.random.key(0), (1, 28, 28, 3))
    step = steps.make_train_step(model, cfg, 16)
    key = jax.random.key(3)
    run = jax.jit(jax.vmap(step, in_axes=(None, None, None, None, None, None, 0), axis_name=parallel.AXIS))
    _, m = run(state, jnp.asarray(images), jnp.asarray(labels), jnp.arange(32, dtype=jnp.int32), jnp.int32(0), key,
               jnp.zeros((1, 1), jnp.int32))

    def reference(dev):
        x = steps.preprocess(jnp.asarray(images[:16]), 28, cfg)
        k = jax.random.fold_in(jax.random.fold_in(key, state.step), dev[0])
        _, drop_key = jax.random.split(k)
        lam, perm = mixup.mixup_params(jax.random.fold_in(k, steps.MIXUP_STREAM), 16, 0.4)
        xm = lam * x + (1 - lam) * x[perm]
        out, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, xm, train=True,
                             mutable=["batch_stats"], rngs={"dropout": drop_key})
        return out, lam, perm

    lg, lam, perm = jax.jit(jax.vmap(reference, axis_name=parallel.AXIS))(jnp.zeros((1, 1), jnp.int32))
    lg, lam, perm = np.asarray(lg[0], np.float64), float(lam[0]), np.asarray(perm[0])
    y = labels[:16]
    t = lam * np.eye(2)[y] + (1 - lam) * np.eye(2)[y[perm]]
    logp = _np_logp(lg)
    ref = np.mean(-(t * logp).sum(-1))
    assert float(m["loss"][0]) == pytest.approx(ref, rel=1e-4)
    assert abs(ref - np.mean(-logp[np.arange(16), y])) > 1e-4  # the mixing changes the loss here


def test_mixup_option_is_validated_and_recorded():
    from lightflax.config import RunConfig
    from lightflax.errors import UserError

    cfg = RunConfig.flat(workdir="w", model="xray_light", mixup=0.2)
    assert cfg.mixup == 0.2 and RunConfig.from_json(cfg.to_json()).mixup == 0.2
    assert RunConfig.flat(workdir="w", model="xray_light").mixup == 0.0  # off by default
    legacy = {k: v for k, v in cfg.to_json().items() if k != "mixup"}  # a run written before the option
    assert RunConfig.from_json(legacy).mixup == 0.0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--mixup"):
            RunConfig.flat(workdir="w", model="xray_light", mixup=bad)
