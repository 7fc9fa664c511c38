"""Comparing a saved tree with its target (leaf paths, shapes, dtypes) and CRC-32 of its bytes."""

from __future__ import annotations

import zlib
from typing import Any, List, Optional, Tuple

import jax
import numpy as np


def _key_str(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_str(path: Tuple[Any, ...]) -> str:
    """A key path as ``a.b.0.c`` (dict keys, attribute names and indices alike)."""
    return ".".join(_key_str(e) for e in path)


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def leaf_specs(tree: Any) -> List[Tuple[str, Tuple[int, ...], str]]:
    """``[(path, shape, dtype), ...]`` of a pytree's array leaves, in flattening order.

    Works for jax/numpy arrays, ``jax.ShapeDtypeStruct`` and Orbax array
    metadata; a namedtuple field and a dict key of the same name give the same path.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_like)
    out = []
    for path, leaf in leaves:
        if _is_array_like(leaf):
            out.append((path_str(path), tuple(int(d) for d in leaf.shape), str(leaf.dtype)))
        else:  # Python scalars
            a = np.asarray(leaf)
            out.append((path_str(path), tuple(a.shape), str(a.dtype)))
    return out


def first_mismatch(expected: List[Tuple[str, Tuple[int, ...], str]],
                   found: List[Tuple[str, Tuple[int, ...], str]]) -> Optional[str]:
    """Describes the first difference between two :func:`leaf_specs` lists, or None."""
    found_by_path = {p: (s, d) for p, s, d in found}
    for path, shape, dtype in expected:
        if path not in found_by_path:
            return f"{path} (shape {shape} {dtype}) is missing from it"
        f_shape, f_dtype = found_by_path[path]
        if f_shape != shape or f_dtype != dtype:
            return f"{path} expected shape {shape} {dtype}, found {f_shape} {f_dtype}"
    expected_paths = {p for p, _, _ in expected}
    for path, shape, dtype in found:
        if path not in expected_paths:
            return f"it holds {path} (shape {shape} {dtype}) that the model does not have"
    return None


def tree_crc32(tree: Any) -> int:
    """CRC-32 over every leaf's shape, dtype and bytes, in flattening order (host copy)."""
    crc = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        crc = zlib.crc32(f"{a.shape}{a.dtype}".encode(), crc)
        crc = zlib.crc32(a.view(np.uint8).reshape(-1) if a.size else b"", crc)
    return crc
