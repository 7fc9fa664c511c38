"""On-device augmentation, jittable and seeded, off by default.

Reproduces Keras' ``ImageDataGenerator`` random affine transform (the study's
settings are :meth:`AugmentConfig.study`): per image a rotation, shifts, shear and
zoom composed as Keras does (``rotation @ shift @ shear @ zoom`` about the image
centre, in (x=column, y=row) coordinates), bilinear sampling (order=1) with
'nearest' edge filling, then a random horizontal flip. Units follow Keras:
rotation and shear in DEGREES (Keras 2.x / 3 ``apply_affine_transform`` converts
shear with ``np.deg2rad``; the study's ``shear_range=0.2`` is thus 0.2 degrees),
shifts as fractions of the width/height, zoom factors drawn independently per axis
from [1 - z, 1 + z]. For square images the transform equals Keras'
``apply_affine_transform`` (tested); for non-square images the width shift moves
columns and the height shift rows (Keras mixes the two axes there).

``AugmentConfig.acquisition()`` (``--augment=acquisition``) instead draws per image photometric
changes that mimic another X-ray acquisition (docs/robust.md): a resolution round trip (down to a
fraction of the side and back, bilinear), a Gaussian blur, an exposure curve (gamma), a contrast
change about the image mean and additive Gaussian noise, each applied with probability
``acquisition_p``; results are clipped to [0, 1]. :func:`acquisition_params` samples them,
:func:`apply_acquisition` applies given parameters (deterministic; tested against NumPy).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transform; the default is no augmentation."""

    rotation_range: float = 0.0  # degrees, uniform in [-r, r]
    width_shift_range: float = 0.0  # fraction of the width, uniform in [-r, r]
    height_shift_range: float = 0.0  # fraction of the height
    shear_range: float = 0.0  # degrees, uniform in [-r, r] (Keras convention)
    zoom_range: float = 0.0  # zoom factors uniform in [1 - z, 1 + z], per axis
    horizontal_flip: bool = False  # flip left-right with probability 1/2
    # acquisition changes (photometric), each applied with probability acquisition_p per image:
    gamma_range: float = 1.0  # exposure curve x ** g, log g uniform in [-log r, log r] (1: off)
    contrast_range: float = 0.0  # (x - mean) * c + mean, c uniform in [1 - r, 1 + r]
    blur_sigma: float = 0.0  # Gaussian blur (5x5 taps), sigma uniform in [0, s] pixels
    noise_std: float = 0.0  # additive Gaussian noise, std uniform in [0, s] ([0, 1] units)
    lowres_scales: Tuple[float, ...] = ()  # down to round(scale * side) and back, one scale drawn per image
    acquisition_p: float = 0.5

    @classmethod
    def study(cls) -> "AugmentConfig":
        """The study's ImageDataGenerator settings."""
        return cls(rotation_range=30.0, width_shift_range=0.1, height_shift_range=0.1, shear_range=0.2,
                   zoom_range=0.2, horizontal_flip=True)

    @classmethod
    def acquisition(cls) -> "AugmentConfig":
        """Acquisition-mimicking changes (no geometry): docs/robust.md."""
        return cls(gamma_range=1.5, contrast_range=0.4, blur_sigma=1.0, noise_std=0.04,
                   lowres_scales=(0.5, 0.65, 0.8))

    @property
    def photometric(self) -> bool:
        return bool(self.gamma_range != 1.0 or self.contrast_range or self.blur_sigma or self.noise_std
                    or self.lowres_scales)

    @property
    def affine(self) -> bool:
        return any((self.rotation_range, self.width_shift_range, self.height_shift_range, self.shear_range,
                    self.zoom_range))

    @property
    def active(self) -> bool:
        return self.affine or self.horizontal_flip or self.photometric


def from_name(name: str) -> Optional[AugmentConfig]:
    """``--augment``'s value -> its config (None: no augmentation)."""
    return {"none": None, "study": AugmentConfig.study(), "acquisition": AugmentConfig.acquisition()}[name]


def sample_params(rng: Array, n: int, height: int, width: int, cfg: AugmentConfig) -> Dict[str, Array]:
    """Random transform parameters of ``n`` images, each (n,).

    theta, shear: radians; tx: column shift, ty: row shift (pixels); zx, zy:
    column/row zoom; flip: bool.
    """
    ks = jax.random.split(rng, 7)

    def u(k, lo, hi):
        return jax.random.uniform(k, (n,), jnp.float32, lo, hi)

    return {
        "theta": u(ks[0], -1.0, 1.0) * math.radians(cfg.rotation_range),
        "tx": u(ks[1], -1.0, 1.0) * cfg.width_shift_range * width,
        "ty": u(ks[2], -1.0, 1.0) * cfg.height_shift_range * height,
        "shear": u(ks[3], -1.0, 1.0) * math.radians(cfg.shear_range),
        "zx": u(ks[4], 1.0 - cfg.zoom_range, 1.0 + cfg.zoom_range),
        "zy": u(ks[5], 1.0 - cfg.zoom_range, 1.0 + cfg.zoom_range),
        "flip": jax.random.bernoulli(ks[6], 0.5, (n,)) if cfg.horizontal_flip else jnp.zeros((n,), bool),
    }


def affine_matrices(p: Dict[str, Array]) -> Array:
    """(n, 3, 3) maps from output (x, y, 1) to input coordinates about the centre:
    rotation @ shift @ shear @ zoom, as Keras composes them."""
    c, s = jnp.cos(p["theta"]), jnp.sin(p["theta"])
    one, zero = jnp.ones_like(c), jnp.zeros_like(c)

    def mat(rows):
        return jnp.stack([jnp.stack(r, -1) for r in rows], -2)

    rot = mat([(c, -s, zero), (s, c, zero), (zero, zero, one)])
    shift = mat([(one, zero, p["tx"]), (zero, one, p["ty"]), (zero, zero, one)])
    shear = mat([(one, -jnp.sin(p["shear"]), zero), (zero, jnp.cos(p["shear"]), zero), (zero, zero, one)])
    zoom = mat([(p["zx"], zero, zero), (zero, p["zy"], zero), (zero, zero, one)])
    return rot @ shift @ shear @ zoom


def bilinear_sample(image: Array, rows: Array, cols: Array) -> Array:
    """image (H, W, C) sampled at float coordinates rows, cols (H', W'); edges repeat."""
    h, w = image.shape[0], image.shape[1]
    rows = jnp.clip(rows, 0.0, h - 1.0)
    cols = jnp.clip(cols, 0.0, w - 1.0)
    r0 = jnp.clip(jnp.floor(rows), 0, h - 1).astype(jnp.int32)
    c0 = jnp.clip(jnp.floor(cols), 0, w - 1).astype(jnp.int32)
    r1, c1 = jnp.minimum(r0 + 1, h - 1), jnp.minimum(c0 + 1, w - 1)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    top = image[r0, c0] * (1 - fc) + image[r0, c1] * fc
    bottom = image[r1, c0] * (1 - fc) + image[r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def apply_affine(images: Array, matrices: Array) -> Array:
    """Warps float images (B, H, W, C) by output->input ``matrices`` (B, 3, 3) in (x, y)."""
    _, h, w, _ = images.shape
    cy, cx = h / 2.0 - 0.5, w / 2.0 - 0.5
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx,
                          indexing="ij")
    coords = jnp.stack([xs.ravel(), ys.ravel(), jnp.ones(h * w, jnp.float32)])  # (3, H*W)
    src = jnp.einsum("bij,jp->bip", matrices.astype(jnp.float32), coords)
    src_x = src[:, 0].reshape(-1, h, w) + cx
    src_y = src[:, 1].reshape(-1, h, w) + cy
    return jax.vmap(bilinear_sample)(images, src_y, src_x)


def augment(rng: Array, images: Array, cfg: AugmentConfig) -> Array:
    """Random affine transform then horizontal flip of float images (B, H, W, C). Jittable;
    ``cfg`` is static. Returns images unchanged when ``cfg`` is off."""
    if cfg is None or not cfg.active:
        return images
    n, h, w, _ = images.shape
    p = sample_params(rng, n, h, w, cfg)
    out = apply_affine(images, affine_matrices(p)) if cfg.affine else images
    if cfg.horizontal_flip:
        out = jnp.where(p["flip"][:, None, None, None], out[:, :, ::-1, :], out)
    if cfg.photometric:
        out = apply_acquisition(out, acquisition_params(jax.random.fold_in(rng, 1), n, cfg), cfg)
    return out.astype(images.dtype)


def acquisition_params(rng: Array, n: int, cfg: AugmentConfig) -> Dict[str, Array]:
    """Per image (n,): gamma, contrast, blur sigma, noise std (1 / 1 / 0 / 0 where not drawn), the
    index of the resolution scale (-1: none) and a noise key."""
    ks = jax.random.split(rng, 11)
    on = [jax.random.bernoulli(ks[i], cfg.acquisition_p, (n,)) for i in range(5)]

    def u(k, lo, hi):
        return jax.random.uniform(k, (n,), jnp.float32, lo, hi)

    log_g = math.log(max(cfg.gamma_range, 1.0))
    return {
        "gamma": jnp.where(on[0], jnp.exp(u(ks[5], -log_g, log_g)), 1.0),
        "contrast": jnp.where(on[1], u(ks[6], 1.0 - cfg.contrast_range, 1.0 + cfg.contrast_range), 1.0),
        "blur": jnp.where(on[2], u(ks[7], 0.0, cfg.blur_sigma), 0.0),
        "noise": jnp.where(on[3], u(ks[8], 0.0, cfg.noise_std), 0.0),
        "scale": (jnp.where(on[4], jax.random.randint(ks[9], (n,), 0, len(cfg.lowres_scales)), -1)
                  if cfg.lowres_scales else jnp.full((n,), -1, jnp.int32)),
        "noise_key": ks[10],
    }


def gaussian_taps(sigma: Array, radius: int = 2) -> Array:
    """(n, 2 * radius + 1) normalised Gaussian taps of per-image ``sigma`` (sigma 0: the identity)."""
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    s = jnp.maximum(sigma, 1e-3)[:, None]
    g = jnp.exp(-0.5 * (t[None, :] / s) ** 2)
    return g / jnp.sum(g, axis=1, keepdims=True)


def blur(images: Array, sigma: Array, radius: int = 2) -> Array:
    """Separable Gaussian blur of (B, H, W, C) images with per-image ``sigma``; edges repeat."""
    g = gaussian_taps(sigma, radius)[:, :, None, None, None]
    _, h, w, _ = images.shape
    pad = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(g[:, i] * pad[:, i:i + h, :, :] for i in range(2 * radius + 1))
    return sum(g[:, i] * rows[:, :, i:i + w, :] for i in range(2 * radius + 1))


@functools.lru_cache(maxsize=64)
def round_trip_matrix(side: int, scale: float) -> np.ndarray:
    """(side, side) float32 linear map of one axis: down to round(scale * side) (antialiased bilinear,
    jax.image.resize) and back up (bilinear). Resizing is separable and linear, so the 2-D round
    trip of an image X is ``M @ X @ M.T``: two small matmuls instead of two resizes per step."""
    eye = np.eye(side, dtype=np.float32)
    small = max(1, round(scale * side))
    with jax.ensure_compile_time_eval():  # constants, also when called while tracing
        down = np.asarray(jax.image.resize(eye, (small, side), "bilinear", antialias=True))
        return np.asarray(jax.image.resize(down, (side, side), "bilinear")).astype(np.float32)


def round_trip(images: Array, scale: float) -> Array:
    """(B, H, W, C) down to round(scale * side) and back (:func:`round_trip_matrix` per axis)."""
    mh = jnp.asarray(round_trip_matrix(images.shape[1], scale))
    mw = jnp.asarray(round_trip_matrix(images.shape[2], scale))
    return jnp.einsum("ih,bhwc,jw->bijc", mh, images, mw)


def apply_acquisition(images: Array, p: Dict[str, Array], cfg: AugmentConfig) -> Array:
    """Applies :func:`acquisition_params`' ``p`` to float images in [0, 1] (B, H, W, C), in the order
    resolution, blur, gamma, contrast, noise; clipped to [0, 1]."""
    x = jnp.clip(images.astype(jnp.float32), 0.0, 1.0)
    for i, scale in enumerate(cfg.lowres_scales):
        x = jnp.where((p["scale"] == i)[:, None, None, None], round_trip(x, scale), x)
    if cfg.blur_sigma:
        x = jnp.where((p["blur"] > 0)[:, None, None, None], blur(x, p["blur"]), x)
    x = jnp.clip(x, 0.0, 1.0) ** p["gamma"][:, None, None, None]
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    x = mean + p["contrast"][:, None, None, None] * (x - mean)
    noise = jax.random.normal(p["noise_key"], x.shape[:3] + (1,), jnp.float32)  # one per pixel, all channels
    x = x + p["noise"][:, None, None, None] * noise
    return jnp.clip(x, 0.0, 1.0)
