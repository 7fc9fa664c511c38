"""Device-resident batching, streaming, on-device preprocessing and augmentation."""

import os
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from lightflax.data import augment as aug
from lightflax.data import pipeline
from lightflax.data.types import Split



def _split(n=23, h=5, w=4, c=1, seed=0):
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), np.arange(n, dtype=np.int32))


def test_epoch_permutation_is_deterministic_and_jittable():
    p = np.asarray(pipeline.epoch_permutation(1, 0, 24))
    assert sorted(p.tolist()) == list(range(24))
    np.testing.assert_array_equal(p, np.asarray(pipeline.epoch_permutation(1, 0, 24)))
    assert not np.array_equal(p, np.asarray(pipeline.epoch_permutation(2, 0, 24)))
    assert not np.array_equal(p, np.asarray(pipeline.epoch_permutation(1, 1, 24)))
    # traced seeds (the trainer vmaps over its replicas' seeds) give the same orders
    both = jax.jit(jax.vmap(lambda s: pipeline.epoch_permutation(s, 0, 24)))(jnp.asarray([1, 2], jnp.int32))
    np.testing.assert_array_equal(np.asarray(both[0]), p)


def test_drop_remainder_batches_are_disjoint():
    split = _split(n=23)
    images, labels = jnp.asarray(split.images), jnp.asarray(split.labels)
    perm = pipeline.epoch_permutation(0, 3, 23)
    ys = [np.asarray(pipeline.get_batch(images, labels, perm, jnp.int32(step), 5)[1]) for step in range(23 // 5)]
    assert len(ys) == 4 and len(set(np.concatenate(ys).tolist())) == 20


def test_eval_batches_cover_all_once_with_mask():
    split = _split(n=23)
    images, labels = jnp.asarray(split.images), jnp.asarray(split.labels)
    got = []
    for start in range(0, 23, 10):
        x, y, m = pipeline.get_eval_batch(images, labels, jnp.int32(start), 10)
        assert x.shape == (10, 5, 4, 1) and m.dtype == jnp.bool_
        m = np.asarray(m)
        np.testing.assert_array_equal(np.asarray(x)[m], split.images[np.asarray(y)[m]])
        got += np.asarray(y)[m].tolist()
    assert got == list(range(23))


def test_get_batch_is_jittable_with_a_traced_step():
    split = _split(n=16)
    images, labels = jnp.asarray(split.images), jnp.asarray(split.labels)
    perm = pipeline.epoch_permutation(0, 0, 16)

    @jax.jit
    def total(step):  # as a train step would call it
        x, y = pipeline.get_batch(images, labels, perm, step, 4)
        return pipeline.preprocess(x, out_size=None, channels=3, mean=None).sum(), y

    for step in range(4):
        s, y = total(jnp.int32(step))
        idx = np.asarray(perm)[step * 4:(step + 1) * 4]
        np.testing.assert_array_equal(np.asarray(y), split.labels[idx])
        np.testing.assert_allclose(float(s), split.images[idx].astype(np.float64).sum() * 3 / 255, rtol=1e-5)


def test_preprocess_matches_numpy_and_pillow():
    from PIL import Image

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 17, 17, 1), dtype=np.uint8)
    mean = (0.4, 0.5, 0.6)
    out = np.asarray(pipeline.preprocess(jnp.asarray(x), out_size=17, channels=3, mean=mean))
    ref = np.repeat(x.astype(np.float64) / 255.0, 3, axis=-1) - np.asarray(mean)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert out.dtype == np.float32
    for size in (9, 40):  # bilinear, antialiased when shrinking = Pillow's BILINEAR resize
        out = np.asarray(pipeline.preprocess(jnp.asarray(x), out_size=size, channels=1))
        for b in range(2):
            pil = Image.fromarray(x[b, ..., 0].astype(np.float32) / 255.0, mode="F")
            ref = np.asarray(pil.resize((size, size), Image.BILINEAR))
            np.testing.assert_allclose(out[b, ..., 0], ref, atol=2e-6)
    rgb = rng.integers(0, 256, (1, 3, 3, 3), dtype=np.uint8)
    gray = np.asarray(pipeline.preprocess(jnp.asarray(rgb), out_size=None, channels=1))
    np.testing.assert_allclose(gray[..., 0], rgb.astype(np.float64) @ [0.299, 0.587, 0.114] / 255, atol=1e-6)
    np.testing.assert_allclose(pipeline.channel_mean(x), [x.mean() / 255.0])


# ----------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------


def _float_images(n=3, h=15, w=15, c=2):
    return jnp.asarray(np.random.default_rng(1).random((n, h, w, c)), jnp.float32)


def test_augment_off_by_default_and_flip_only():
    x = _float_images()
    key = jax.random.key(0)
    assert not aug.AugmentConfig().active
    assert aug.augment(key, x, aug.AugmentConfig()) is x
    cfg = aug.AugmentConfig(horizontal_flip=True)
    out = np.asarray(aug.augment(key, x, cfg))
    flips = np.asarray(aug.sample_params(key, 3, 15, 15, cfg)["flip"])
    for i in range(3):
        np.testing.assert_array_equal(out[i], np.asarray(x[i])[:, ::-1] if flips[i] else np.asarray(x[i]))


def _scipy_reference(img, p):
    """Keras' construction in float64 with scipy.ndimage (order 1, mode 'nearest')."""
    import scipy.ndimage

    th, sh = p["theta"], p["shear"]
    m = (np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
         @ np.array([[1, 0, p["tx"]], [0, 1, p["ty"]], [0, 0, 1]])
         @ np.array([[1, -np.sin(sh), 0], [0, np.cos(sh), 0], [0, 0, 1]])
         @ np.array([[p["zx"], 0, 0], [0, p["zy"], 0], [0, 0, 1]]))
    h, w = img.shape[:2]
    o = np.array([[1, 0, w / 2 - 0.5], [0, 1, h / 2 - 0.5], [0, 0, 1]])
    m = o @ m @ np.linalg.inv(o)  # in (x=col, y=row)
    m = m[[1, 0, 2]][:, [1, 0, 2]]  # to scipy's (row, col)
    return np.stack([scipy.ndimage.affine_transform(img[..., c], m[:2, :2], m[:2, 2], order=1, mode="nearest")
                     for c in range(img.shape[-1])], -1)


@pytest.mark.parametrize("hw", [(15, 15), (12, 17)])
def test_affine_matches_float64_reference(hw):
    pytest.importorskip("scipy")
    x = _float_images(n=4, h=hw[0], w=hw[1])
    cfg = aug.AugmentConfig(rotation_range=30, width_shift_range=0.2, height_shift_range=0.1, shear_range=15,
                            zoom_range=0.2)
    p = aug.sample_params(jax.random.key(3), 4, hw[0], hw[1], cfg)
    out = np.asarray(aug.apply_affine(x, aug.affine_matrices(p)))
    for i in range(4):
        pi = {k: float(np.asarray(v)[i]) for k, v in p.items() if k != "flip"}
        np.testing.assert_allclose(out[i], _scipy_reference(np.asarray(x[i], np.float64), pi), atol=2e-5)


def test_affine_matches_keras_image_data_generator():
    pytest.importorskip("scipy")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        from keras.src.legacy.preprocessing.image import apply_affine_transform
    except Exception as e:  # keras missing or its backend unavailable
        pytest.skip(f"keras' apply_affine_transform unavailable: {type(e).__name__}")
    x = np.random.default_rng(2).random((16, 16, 2))
    params = dict(theta=20.0, tx=2.3, ty=-1.7, shear=10.0, zx=0.9, zy=1.15)
    with warnings.catch_warnings():  # keras calls the deprecated scipy.ndimage.interpolation namespace
        warnings.simplefilter("ignore", DeprecationWarning)
        ref = apply_affine_transform(x, row_axis=0, col_axis=1, channel_axis=2, fill_mode="nearest", order=1,
                                     **params)
    p = {k: jnp.asarray([v], jnp.float32) for k, v in params.items()}
    p["theta"], p["shear"] = jnp.deg2rad(p["theta"]), jnp.deg2rad(p["shear"])
    out = aug.apply_affine(jnp.asarray(x[None], jnp.float32), aug.affine_matrices(p))[0]
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


def test_study_augment_seeded_jittable_and_bounded():
    x = _float_images(n=6)
    cfg = aug.AugmentConfig.study()
    assert (cfg.rotation_range, cfg.zoom_range, cfg.width_shift_range, cfg.height_shift_range, cfg.shear_range,
            cfg.horizontal_flip) == (30, 0.2, 0.1, 0.1, 0.2, True)
    f = jax.jit(aug.augment, static_argnums=2)
    a = np.asarray(f(jax.random.key(1), x, cfg))
    np.testing.assert_array_equal(a, np.asarray(f(jax.random.key(1), x, cfg)))
    assert not np.allclose(a, np.asarray(f(jax.random.key(2), x, cfg)))
    assert a.shape == x.shape and a.dtype == np.float32
    assert a.min() >= float(x.min()) - 1e-6 and a.max() <= float(x.max()) + 1e-6  # convex combinations only
    p = aug.sample_params(jax.random.key(0), 1000, 15, 15, cfg)
    assert float(jnp.abs(p["theta"]).max()) <= np.radians(30) + 1e-6
    assert float(jnp.abs(p["tx"]).max()) <= 1.5 + 1e-6 and 0.8 - 1e-6 <= float(p["zx"].min())
    assert 0.3 < float(p["flip"].mean()) < 0.7
