"""Memory checks before anything is allocated: a lower bound from shapes (plan time), and XLA's memory
analysis of the train step compiled on abstract shapes (before the parameters and device data exist)."""

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
    """Memory the host can give now: /proc/meminfo's MemAvailable (free memory plus the page cache
    it can drop), else free pages (sysconf), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
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


def compiled_need_bytes(stats: Optional[Dict[str, int]], resident_bytes: int = 0) -> Optional[int]:
    """Bytes a compiled train step needs while it runs, from XLA's memory analysis
    (``timing.memory_analysis``: arguments + outputs - donated aliases + temporaries + code), plus
    ``resident_bytes`` that live beside it (the selected state's copy, the selection split); None
    when the backend gives no analysis."""
    if not stats or "temp_bytes" not in stats:
        return None
    step = (stats.get("argument_bytes", 0) + stats.get("output_bytes", 0) - stats.get("alias_bytes", 0)
            + stats["temp_bytes"] + stats.get("generated_code_bytes", 0))
    return step + resident_bytes


def device_available_bytes(device=None) -> Optional[int]:
    """Memory one device can give now: an accelerator's limit less what is in use, else the host's
    available memory (None: unknown)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return host_available_bytes()


def advice(num_seeds: int, batch_size: int, image_size: Optional[int], need: int, have: int) -> str:
    """What to change, from the flags given: fewer seeds when there are several (the largest number
    that fits), else a smaller batch, and a smaller input when one was set."""
    per = need / max(1, num_seeds)
    fits = int(have // per) if per else 0
    parts = [f"use --num_seeds={fits} or fewer"] if num_seeds > 1 and 1 <= fits < num_seeds else []
    if batch_size > 1:
        parts.append(f"a smaller --batch_size (now {batch_size})")
    if image_size:
        parts.append(f"a smaller --image_size (now {image_size})")
    if not parts:
        return "this model does not fit this machine at batch 1"
    first = parts[0] if parts[0].startswith("use ") else f"use {parts[0]}"
    return ", or ".join([first, *parts[1:]])


def check_compiled(need: Optional[int], have: Optional[int], num_seeds: int, batch_size: int,
                   image_size: Optional[int]) -> None:
    """Refuses (one line) a run whose compiled train step needs more than ``have``, before its
    parameters, optimiser state or device data exist (only the abstract step was compiled)."""
    if need is None or not have or need <= have:
        return
    raise UserError(f"the compiled train step needs {need / 2**30:.1f} GiB (XLA's memory analysis: inputs, "
                    f"outputs, temporaries, with {num_seeds} seed(s) at batch {batch_size}) but "
                    f"{have / 2**30:.1f} GiB is available; nothing was allocated on the device: "
                    f"{advice(num_seeds, batch_size, image_size, need, have)}")


def check_train_step(trainer):
    """XLA's memory analysis of a ``lightflax.train.Trainer``'s train step compiled on abstract shapes
    (``Trainer.abstract_compile``), against the memory the device has now, before anything of the run
    is allocated (:func:`check_compiled`); returns the compiled step, which the loop runs (None: the
    step is compiled later on the real arguments)."""
    compiled = trainer.abstract_compile()
    if compiled is None:
        return None
    cfg, select = trainer.cfg, trainer.data.splits[trainer.cfg.select_split]
    state_bytes = (compiled.memory or {}).get("output_bytes", 0)  # the new state: the selected copy's size
    resident = state_bytes + np.asarray(select.images).nbytes + np.asarray(select.labels).nbytes
    check_compiled(compiled_need_bytes(compiled.memory, resident), device_available_bytes(),
                   cfg.num_seeds, cfg.batch_size, cfg.image_size)
    return compiled
