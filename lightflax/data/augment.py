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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict

import jax
import jax.numpy as jnp

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

    @classmethod
    def study(cls) -> "AugmentConfig":
        """The study's ImageDataGenerator settings."""
        return cls(rotation_range=30.0, width_shift_range=0.1, height_shift_range=0.1, shear_range=0.2,
                   zoom_range=0.2, horizontal_flip=True)

    @property
    def affine(self) -> bool:
        return any((self.rotation_range, self.width_shift_range, self.height_shift_range, self.shear_range,
                    self.zoom_range))

    @property
    def active(self) -> bool:
        return self.affine or self.horizontal_flip


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
    return out.astype(images.dtype)
