"""--augment=acquisition (lightflax.data.augment): photometric changes that mimic another X-ray
acquisition. Each transform against a float64 NumPy reference with given parameters; the sampled
augmentation is seeded (same key, same images), jittable, keeps shapes and stays in [0, 1]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightflax.data import augment as aug


def _images(n=6, h=20, w=20, c=3):
    gray = np.random.default_rng(3).random((n, h, w, 1))
    return jnp.asarray(np.repeat(gray, c, axis=-1), jnp.float32)  # gray replicated, as the X-ray models see it


def _np_blur(x, sigma, radius=2):
    t = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (t / max(sigma, 1e-3)) ** 2)
    g /= g.sum()
    h, w = x.shape[:2]
    pad = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(g[i] * pad[i:i + h] for i in range(len(t)))
    return sum(g[i] * rows[:, i:i + w] for i in range(len(t)))


def _np_resize_matrix(n_out, n_in, antialias):
    """Triangle-kernel (bilinear) resampling matrix, half-pixel centres; widened by the scale when
    shrinking with antialias (what jax.image.resize / Pillow do)."""
    scale = n_out / n_in
    width = 1.0 / scale if (antialias and scale < 1) else 1.0
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) / scale - 0.5
        w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in) - centre) / width)
        m[i] = w / w.sum()
    return m


def test_round_trip_matrix_is_the_float64_resampling():
    for side, scale in ((28, 0.5), (28, 0.65), (20, 0.8), (64, 0.5)):
        small = max(1, round(scale * side))
        want = _np_resize_matrix(side, small, False) @ _np_resize_matrix(small, side, True)
        np.testing.assert_allclose(aug.round_trip_matrix(side, scale), want, atol=2e-6)
        x = _images(2, side, side)
        ref = jax.image.resize(jax.image.resize(x, (2, small, small, 3), "bilinear", antialias=True), x.shape,
                               "bilinear")
        np.testing.assert_allclose(np.asarray(aug.round_trip(x, scale)), np.asarray(ref), atol=2e-6)


def test_apply_acquisition_against_numpy():
    cfg = aug.AugmentConfig.acquisition()
    x = _images()
    p = {"gamma": jnp.asarray([1.0, 0.7, 1.4, 1.0, 1.2, 1.0]), "contrast": jnp.asarray([1.0, 1.0, 0.7, 1.3, 0.8, 1.0]),
         "blur": jnp.asarray([0.0, 0.0, 0.9, 0.5, 0.0, 0.0]), "noise": jnp.zeros(6),
         "scale": jnp.asarray([-1, 0, -1, 2, 1, -1]), "noise_key": jax.random.key(0)}
    out = np.asarray(aug.apply_acquisition(x, p, cfg))
    xs = np.asarray(x, np.float64)
    for i in range(6):
        y = xs[i]
        s = int(p["scale"][i])
        if s >= 0:
            m = aug.round_trip_matrix(20, cfg.lowres_scales[s]).astype(np.float64)
            y = np.einsum("ih,hwc,jw->ijc", m, y, m)
        if float(p["blur"][i]) > 0:
            y = _np_blur(y, float(p["blur"][i]))
        y = np.clip(y, 0, 1) ** float(p["gamma"][i])
        y = y.mean() + float(p["contrast"][i]) * (y - y.mean())
        np.testing.assert_allclose(out[i], np.clip(y, 0, 1), atol=1e-5, err_msg=f"image {i}")
    np.testing.assert_allclose(out[5], np.asarray(x[5]), atol=1e-6)  # nothing drawn: unchanged


def test_noise_is_one_draw_per_pixel_with_the_drawn_std():
    cfg = aug.AugmentConfig(noise_std=0.1)
    x = jnp.full((2, 64, 64, 3), 0.5, jnp.float32)
    p = {"gamma": jnp.ones(2), "contrast": jnp.ones(2), "blur": jnp.zeros(2), "noise": jnp.asarray([0.0, 0.05]),
         "scale": jnp.full((2,), -1), "noise_key": jax.random.key(1)}
    out = np.asarray(aug.apply_acquisition(x, p, cfg))
    np.testing.assert_allclose(out[0], np.asarray(x[0]), atol=1e-6)
    assert np.array_equal(out[1, ..., 0], out[1, ..., 2])  # a gray image stays gray
    assert abs(float(np.std(out[1] - 0.5)) - 0.05) < 0.005


def test_acquisition_augment_seeded_jittable_bounded():
    cfg = aug.from_name("acquisition")
    assert cfg == aug.AugmentConfig.acquisition() and cfg.photometric and not cfg.affine and cfg.active
    assert aug.from_name("none") is None and aug.from_name("study") == aug.AugmentConfig.study()
    x = _images(16)
    f = jax.jit(aug.augment, static_argnums=2)
    a = np.asarray(f(jax.random.key(1), x, cfg))
    np.testing.assert_array_equal(a, np.asarray(f(jax.random.key(1), x, cfg)))  # determinism per key
    assert not np.allclose(a, np.asarray(f(jax.random.key(2), x, cfg)))
    assert a.shape == x.shape and a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
    p = aug.acquisition_params(jax.random.key(0), 4000, cfg)
    g = np.asarray(p["gamma"])
    assert 1 / 1.5 - 1e-6 <= g.min() and g.max() <= 1.5 + 1e-6 and 0.4 < np.mean(g == 1.0) < 0.6
    c = np.asarray(p["contrast"])
    assert 0.6 - 1e-6 <= c.min() and c.max() <= 1.4 + 1e-6
    assert 0.0 <= float(p["blur"].min()) and float(p["blur"].max()) <= 1.0
    assert 0.0 <= float(p["noise"].min()) and float(p["noise"].max()) <= 0.04
    assert set(np.unique(np.asarray(p["scale"]))) == {-1, 0, 1, 2}


def test_acquisition_flag_is_checked():
    from lightflax.config import DataConfig
    from lightflax.errors import UserError

    assert DataConfig(augment="acquisition").augment == "acquisition"
    with pytest.raises(UserError, match="drop --mean_subtraction"):
        DataConfig(augment="acquisition", mean=(0.5,))
    with pytest.raises(UserError, match="--augment must be one of"):
        DataConfig(augment="contrast")
