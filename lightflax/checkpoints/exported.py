"""Exported model variables: one msgpack file per seed, with its sha256 beside it."""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import jax
import numpy as np
from flax import serialization, traverse_util

from lightflax import files
from lightflax.checkpoints.integrity import first_mismatch
from lightflax.checkpoints.orbax_quiet import one_line
from lightflax.errors import CheckpointError


def export_variables(path: str, variables: Any) -> int:
    """Writes ``variables`` (e.g. ``{'params', 'batch_stats'}``) to ``path`` as msgpack, atomically.

    Written with ``files.atomic_write``: an interrupted export leaves the old file intact.
    Its sha256 goes to ``path + '.sha256'`` (``sha256sum -c`` format), which
    :func:`load_exported` verifies. Returns the file size in bytes (the model's size on disk).
    """
    data = serialization.to_bytes(jax.device_get(variables))
    line = f"{hashlib.sha256(data).hexdigest()}  {os.path.basename(path)}\n"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        files.atomic_write(path, lambda f: f.write(data))
        files.atomic_write(digest_path(path), lambda f: f.write(line), mode="w")
    except OSError as e:
        raise CheckpointError(f"could not write {path} ({e.strerror}); check free disk space and permissions") \
            from None
    return len(data)


def digest_path(path: str) -> str:
    """The sha256 sidecar of an exported model file."""
    return path + ".sha256"


def _verify_digest(path: str, data: bytes) -> None:
    """Compares ``data`` (the bytes of ``path``) with the sha256 written beside it at export.

    A file exported before the sidecar existed is read with a one-line warning."""
    sidecar = digest_path(path)
    if not os.path.exists(sidecar):
        print(f"WARNING: {sidecar} not found; {path} cannot be checked for damage (export it again by "
              f"re-running the training to get one)", file=sys.stderr, flush=True)
        return
    try:
        with open(sidecar) as f:
            want = f.read().split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        want = ""
    if len(want) != 64:
        raise CheckpointError(f"{sidecar} is damaged (no sha256 in it); export the model again by re-running "
                              f"the training")
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise CheckpointError(f"{path} is damaged: its sha256 {got[:12]}... differs from the {want[:12]}... "
                              f"recorded at export in {os.path.basename(sidecar)}; restore the file or re-run "
                              f"the training")


def load_exported(path: str, target: Any) -> Any:
    """Reads a file written by :func:`export_variables` into the structure of ``target``.

    ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
    ``jax.eval_shape(model.init, ...)``). Returns the variables as jax arrays.
    Raises CheckpointError naming the file when it is missing, damaged,
    truncated, or holds other shapes than ``target``.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist; train the model first or check --workdir")
    with open(path, "rb") as f:
        data = f.read()
    _verify_digest(path, data)
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:
        raise CheckpointError(f"{path} is damaged ({one_line(e)}); export it again by re-running the training") \
            from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is damaged (it holds a {type(state).__name__}, not variables); "
                              f"export it again by re-running the training")
    target_dict = serialization.to_state_dict(target)
    expected = [(".".join(k), tuple(int(d) for d in v.shape), str(np.dtype(v.dtype)))
                for k, v in traverse_util.flatten_dict(target_dict).items()]
    found = []
    for k, v in traverse_util.flatten_dict(state).items():
        a = np.asarray(v)
        found.append((".".join(str(p) for p in k), tuple(a.shape), str(a.dtype)))
    mismatch = first_mismatch(expected, found)
    if mismatch is not None:
        raise CheckpointError(f"{path} does not fit this model: {mismatch}; it was exported from a different "
                              f"model or settings")
    restored = serialization.from_state_dict(target, state)
    return jax.tree_util.tree_map(jax.numpy.asarray, restored)
