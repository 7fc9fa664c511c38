"""Torch-free reader of PyTorch weight files (``torch.save`` of a state_dict).

Both on-disk formats are read with a restricted unpickler and NumPy:

* the zip format (torch >= 1.6): ``<root>/data.pkl`` holds the object pickle,
  whose persistent ids ``('storage', StorageType, key, location, numel)`` name
  raw little-endian buffers ``<root>/data/<key>``;
* the legacy format (torch < 1.6, or ``_use_new_zipfile_serialization=False``):
  a sequence of pickles (magic number, protocol, sys info, the object pickle
  with ids ``('storage', StorageType, key, location, numel, view_metadata)``,
  the list of storage keys), then per key an int64 element count and the raw
  bytes.

Tensors are rebuilt from (storage, storage_offset, size, stride) with
``np.lib.stride_tricks.as_strided`` and copied, so non-contiguous views (e.g.
TensorFlow-layout buffers seen through a transposed OIHW view) come out right.
Only the classes needed for plain tensors and OrderedDicts are allowed; any
other class in the pickle is refused (no arbitrary code runs).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Dict

import numpy as np

from lightflax.errors import TorchFileError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _dtype_table() -> Dict[str, np.dtype]:
    import ml_dtypes  # ships with jax

    return {
        "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
        "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
        "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
        "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
        "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
    }


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: carries only the dtype."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    """A flat 1-D NumPy buffer (filled later for the legacy format)."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel = dtype, numel
        self.array: np.ndarray | None = None


class _StorageView:
    def __init__(self, base: _Storage, offset: int, size: int):
        self.base, self.offset, self.size = base, offset, size

    @property
    def dtype(self):
        return self.base.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> "_LazyTensor":
    return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                       tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    return data


class _LazyTensor:
    """(storage, offset, size, stride): materialised once every storage is read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> np.ndarray:
        st = self.storage
        base_offset = 0
        if isinstance(st, _StorageView):
            base_offset, st = st.offset, st.base
        buf = st.array
        if buf is None:
            raise TorchFileError("a storage was never read (file truncated?)")
        start = base_offset + self.offset
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, buf.dtype)
        span = 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if start < 0 or start + span > buf.size or any(s < 0 for s in self.stride):
            raise TorchFileError(
                f"tensor view (offset {start}, size {self.size}, stride {self.stride}) "
                f"exceeds its storage of {buf.size} elements")
        flat = buf[start:]
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat, shape=self.size, strides=tuple(s * item for s in self.stride), writeable=False)
        return np.array(view, copy=True, order="C")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load_fn):
        super().__init__(file)
        self._persistent_load_fn = persistent_load_fn
        self._dtypes = _dtype_table()

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in self._dtypes:
            return _StorageType(name, self._dtypes[name])
        raise TorchFileError(f"refusing to unpickle {module}.{name} (only plain tensors and "
                             "OrderedDicts are supported)")

    def persistent_load(self, pid):
        return self._persistent_load_fn(pid)


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items()) if isinstance(
            obj, collections.OrderedDict) else {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _storage_dtype(storage_type) -> np.dtype:
    if not isinstance(storage_type, _StorageType):
        raise TorchFileError(f"unsupported storage type {storage_type!r}")
    return storage_type.dtype


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise TorchFileError("zip file without data.pkl: not a torch.save file")
        root = pkl[0][: -len("data.pkl")]
        if root + "byteorder" in names and zf.read(root + "byteorder").strip() != b"little":
            raise TorchFileError("big-endian torch files are not supported")
        storages: Dict[str, _Storage] = {}

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise TorchFileError(f"unknown persistent id {pid!r}")
            _, storage_type, key, _location, numel = pid[:5]
            if key not in storages:
                dtype = _storage_dtype(storage_type)
                st = _Storage(dtype, int(numel))
                raw = zf.read(f"{root}data/{key}")
                if len(raw) < int(numel) * dtype.itemsize:
                    raise TorchFileError(f"storage {key} holds {len(raw)} bytes, expected "
                                         f"{int(numel) * dtype.itemsize}")
                st.array = np.frombuffer(raw, dtype=dtype, count=int(numel))
                storages[key] = st
            return storages[key]

        obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), persistent_load).load()
    return _materialize(obj)


def _no_persistent(pid):
    raise TorchFileError(f"unexpected persistent id {pid!r}")


def _plain_load(f) -> Any:
    """One pickle of plain data (numbers, strings, lists, dicts): the legacy headers."""
    return _Unpickler(f, _no_persistent).load()


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            magic = _plain_load(f)
        except TorchFileError:
            raise
        except Exception as e:  # noqa: BLE001 - any unpickling failure means "not this format"
            raise TorchFileError(f"not a PyTorch file ({type(e).__name__})") from None
        if magic != LEGACY_MAGIC:
            raise TorchFileError("not a PyTorch file (bad magic number)")
        protocol = _plain_load(f)
        if protocol != LEGACY_PROTOCOL:
            raise TorchFileError(f"unsupported legacy protocol {protocol!r}")
        sys_info = _plain_load(f)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise TorchFileError("big-endian torch files are not supported")
        storages: Dict[str, _Storage] = {}
        views: Dict[str, _StorageView] = {}

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise TorchFileError(f"unknown persistent id {pid!r}")
            _, storage_type, key, _location, numel, view_metadata = pid
            if key not in storages:
                storages[key] = _Storage(_storage_dtype(storage_type), int(numel))
            if view_metadata is not None:
                view_key, offset, view_size = view_metadata
                if view_key not in views:
                    views[view_key] = _StorageView(storages[key], int(offset), int(view_size))
                return views[view_key]
            return storages[key]

        obj = _Unpickler(f, persistent_load).load()
        keys = _plain_load(f)
        for key in keys:
            st = storages.get(key)
            if st is None:
                raise TorchFileError(f"storage {key} listed but never referenced")
            header = f.read(8)
            if len(header) < 8:
                raise TorchFileError(f"file truncated before storage {key}")
            (count,) = struct.unpack("<q", header)
            nbytes = count * st.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) < nbytes:
                raise TorchFileError(f"file truncated inside storage {key} "
                                     f"({len(raw)} of {nbytes} bytes)")
            st.array = np.frombuffer(raw, dtype=st.dtype, count=count)
    return _materialize(obj)


def load(path: str | os.PathLike) -> Any:
    """Reads a ``torch.save`` file into NumPy arrays (same nesting, same keys).

    Returns e.g. an OrderedDict ``{name: np.ndarray}`` for a state_dict; every
    array is C-contiguous and owns its memory. Raises TorchFileError (one
    line) for files that are not torch files, truncated files or files that
    hold objects other than tensors/containers.
    """
    path = os.fspath(path)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip archive whose directory (at the end) is gone
                raise TorchFileError("file truncated or damaged: a zip archive (torch >= 1.6 format) without "
                                     "its central directory")
        return _load_legacy(path)
    except TorchFileError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error, KeyError,
            ValueError, TypeError) as e:
        raise TorchFileError(f"unreadable PyTorch file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None

