"""The device-memory estimate that refuses a --num_seeds too large for the device, before any work."""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lightflax.errors import UserError


def available_memory_bytes(device=None) -> Optional[int]:
    """Memory of one device: an accelerator's own limit, else the host's physical memory (None: unknown)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def lower_bound_bytes(model, input_shape: Tuple[int, ...], local_batch: int, num_seeds: int) -> int:
    """Bytes one device needs at least: per replica four float32 copies of the variables (parameters,
    gradients, Adam's two moments) plus one float32 batch of inputs and of the first layer's outputs."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    n_vars = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))
    batch = local_batch * int(np.prod(input_shape)) * 4 * 2
    return num_seeds * (16 * n_vars + batch)


def check_memory(model, input_shape: Tuple[int, ...], local_batch: int, num_seeds: int) -> None:
    """Refuses (one line) a --num_seeds whose lower-bound estimate exceeds the device's memory."""
    need, have = lower_bound_bytes(model, input_shape, local_batch, num_seeds), available_memory_bytes()
    if have and need > have:
        per = need / num_seeds
        fix = (f"use --num_seeds={max(1, int(have // per))} or fewer, or a smaller --batch_size" if num_seeds > 1
               and have >= per else "use a smaller --batch_size or --image_size")
        raise UserError(f"--num_seeds {num_seeds} needs at least {need / 2**30:.1f} GiB "
                        f"({per / 2**20:.0f} MiB per replica) but the device has {have / 2**30:.1f} GiB; {fix}")


def host_available_bytes() -> Optional[int]:
    """Memory the host can give now (MemAvailable), or None when unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_budget(parts: Dict[str, Tuple[int, str]], have: Optional[int]) -> None:
    """Refuses (one line) a plan whose estimated bytes, from shapes alone and before anything is
    allocated, exceed ``have``. ``parts``: {what: (bytes, the flag change that shrinks it)}; the
    advice names the change of the largest part."""
    need = sum(b for b, _ in parts.values())
    if not have or need <= have:
        return
    fix = max(parts.values())[1]
    listing = ", ".join(f"{k} {b / 2**30:.1f} GiB" for k, (b, _) in parts.items())
    raise UserError(f"this run needs at least {need / 2**30:.1f} GiB ({listing}) but {have / 2**30:.1f} GiB "
                    f"is available; nothing was allocated: {fix}")
