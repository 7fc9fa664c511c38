"""Data parallelism: the ONE place where a per-device step is wrapped.

A step is written once as a per-device function with explicit collectives
(``lax.pmean(..., AXIS)``), pmap semantics: replicated state without a leading
device axis, batches sharded on axis 0. :func:`distribute` applies it with

  'shard_map'  ``jax.jit(jax.shard_map(f, mesh, in_specs, out_specs))`` (default), or
  'pmap'       ``jax.pmap(f, axis_name=AXIS)`` with in_axes/out_axes derived from the
               same specs (sharded arguments are reshaped to (devices, per-device, ...)).

Since JAX 0.10 ``jax.pmap`` itself wraps ``jit(shard_map)``; both are measured in
docs/speed.md ("Engine timings": pmap vs shard_map).
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lightflax.config import PARALLEL_MODES as MODES
from lightflax.errors import UserError

AXIS = "batch"

SHARDED = P(AXIS)
REPLICATED = P()


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.array(devices), (AXIS,))


def _put(a, sharding):
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(a)
        return jax.random.wrap_key_data(_put(jax.random.key_data(a), sharding), impl=impl)
    # Multi-process: every process holds the same host value and fills its own devices.
    if isinstance(a, jax.Array) and a.sharding == sharding:
        return a
    host = np.asarray(jax.device_get(a)) if isinstance(a, jax.Array) and a.is_fully_addressable else a
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return jax.jit(lambda x: x, out_shardings=sharding)(a)
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree, mesh: Mesh):
    """Puts a host pytree on every device of ``mesh`` (no leading device axis)."""
    sharding = NamedSharding(mesh, REPLICATED)
    return jax.tree_util.tree_map(lambda a: _put(a, sharding), tree)


def shard(tree, mesh: Mesh):
    """Shards a host pytree's leading axis across ``mesh``."""
    sharding = NamedSharding(mesh, SHARDED)
    return jax.tree_util.tree_map(lambda a: _put(a, sharding), tree)


def _is_sharded(spec) -> bool:
    return isinstance(spec, P) and len(spec) > 0 and spec[0] == AXIS


def distribute(
    fn: Callable,
    mesh: Mesh,
    in_specs: Sequence[Any],
    out_specs: Any,
    *,
    mode: str = "shard_map",
    donate_argnums: Sequence[int] = (),
) -> Callable:
    """Wraps a per-device function for data-parallel execution over ``mesh``.

    Args:
      fn: per-device function using collectives over ``AXIS``.
      in_specs: one of ``REPLICATED`` / ``SHARDED`` per positional argument (a
        spec applies to the whole pytree of that argument).
      out_specs: a spec or a tuple of specs matching the outputs.
      mode: 'shard_map' (default) or 'pmap'.
    Returns:
      A callable taking global arrays (sharded arguments with the global batch
      on axis 0) and returning global outputs.
    """
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}")
    in_specs = tuple(in_specs)
    if mode == "shard_map":
        # check_vma=False keeps pmap semantics: with varying-manual-axes typing on,
        # the gradient of a replicated input is psum-ed by autodiff itself, and the
        # explicit lax.pmean of the step would then average an already summed
        # gradient (n_devices times too large; caught by tests/test_train.py).
        mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        return jax.jit(mapped, donate_argnums=tuple(donate_argnums))

    return _over_pmap(fn, mesh, in_specs, out_specs, tuple(donate_argnums))


def _over_pmap(fn: Callable, mesh: Mesh, in_specs: Tuple[Any, ...], out_specs: Any,
               donate_argnums: Tuple[int, ...]) -> Callable:
    """:func:`distribute`'s ``mode='pmap'``: global arrays split into a leading device axis and back."""
    n = mesh.devices.size
    in_axes = tuple(0 if _is_sharded(s) else None for s in in_specs)
    out_tuple = out_specs if isinstance(out_specs, tuple) else (out_specs,)
    out_axes = tuple(0 if _is_sharded(s) else None for s in out_tuple)
    pmapped = jax.pmap(
        fn,
        axis_name=AXIS,
        in_axes=in_axes,
        out_axes=out_axes if isinstance(out_specs, tuple) else out_axes[0],
        devices=list(mesh.devices.flat),
        donate_argnums=donate_argnums,
    )

    def split_args(args):
        return tuple(jax.tree_util.tree_map(_split(n), a) if ax == 0 else a for a, ax in zip(args, in_axes))

    def merge_outs(outs):
        outs_t = outs if isinstance(out_specs, tuple) else (outs,)
        outs_t = tuple(jax.tree_util.tree_map(_merge, o) if ax == 0 else o for o, ax in zip(outs_t, out_axes))
        return outs_t if isinstance(out_specs, tuple) else outs_t[0]

    def wrapped(*args):
        return merge_outs(pmapped(*split_args(args)))

    def lower(*args):
        return _PmapLowered(pmapped.lower(*split_args(args)), split_args, merge_outs)

    wrapped.lower = lower  # type: ignore[attr-defined]  (ahead-of-time, like jit)
    wrapped.pmapped = pmapped  # type: ignore[attr-defined]
    return wrapped


def _split(n):
    return lambda a: a.reshape((n, a.shape[0] // n) + a.shape[1:])


def _merge(a):
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


class _PmapLowered:
    """``lower()`` of a pmap-wrapped step: compiles to a callable taking global arrays."""

    def __init__(self, lowered, split_args, merge_outs):
        self._lowered, self._split, self._merge = lowered, split_args, merge_outs

    def compile(self):
        return _PmapCompiled(self._lowered.compile(), self._split, self._merge)


class _PmapCompiled:
    def __init__(self, compiled, split_args, merge_outs):
        self._compiled, self._split, self._merge = compiled, split_args, merge_outs

    def __call__(self, *args):
        return self._merge(self._compiled(*self._split(args)))

    def cost_analysis(self):
        return self._compiled.cost_analysis()

    def memory_analysis(self):
        return self._compiled.memory_analysis()


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"batch_size {global_batch} is not divisible by the {n} devices; "
            f"use a multiple of {n}"
        )
    return global_batch // n


def device_ids(mesh: Mesh) -> jax.Array:
    """0..n-1 sharded over ``mesh``: each device's own index, as a SHARDED argument.

    (pmap needs at least one mapped argument; steps whose other inputs are all
    replicated take this one and read their position from it.)
    """
    return shard(np.arange(mesh.devices.size, dtype=np.int32), mesh)


def initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                           process_id: Optional[int]) -> None:
    """``jax.distributed.initialize`` for a multi-process run; a no-op when all three are None."""
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if not any(given):
        return
    if not all(given):
        raise UserError("multi-process runs need all of --coordinator_address, --num_processes and --process_id")
    if process_id >= num_processes:
        raise UserError(f"--process_id {process_id} must be < --num_processes {num_processes}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a local multi-process run's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
