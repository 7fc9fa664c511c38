"""Finds, checks and registers the native kernel library (one attempt per process).

The library is the optional setuptools extension ``lightflax/native/_lightflax_native*.so``
(or the file named by ``$LIGHTFLAX_NATIVE_LIB``). It is a plain shared library of XLA FFI
handlers, loaded with ctypes. Outcomes:

  * found, ABI and oneDNN version match -> handlers registered with ``jax.ffi`` for CPU;
  * not built (no oneDNN wheel or no compiler at install) -> XLA kernels, silently (status says why);
  * present but broken (cannot be loaded, missing symbol, oneDNN version mismatch, the oneDNN
    runtime wheel missing) ->
    XLA kernels and ONE line on stderr naming the problem and the fallback.

oneDNN is the PyPI wheel ``onednn-cpu-gomp`` (libdnnl.so.3 in the environment's lib/, not on the
loader's search path): ``preload_onednn`` opens it by its full path first, so the extension's
dependency on "libdnnl.so.3" (its soname) resolves to that already-loaded copy. It is opened
RTLD_LOCAL: its symbols stay out of the global namespace (jaxlib, another oneDNN).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.machinery
import os
import sys
from typing import Optional

ENV_LIB = "LIGHTFLAX_NATIVE_LIB"
ABI_VERSION = 7
ONEDNN_WHEEL = "onednn-cpu-gomp"
ONEDNN_SONAME = "libdnnl.so.3"
HINT = "pip install onednn-devel-cpu-gomp==2023.2.0 with a C++17 compiler (g++), then reinstall lightflax"

# FFI target name -> exported handler symbol.
TARGETS = {
    "lightflax_conv_fwd": "LfConvFwd",
    "lightflax_conv_bwd": "LfConvBwd",
    "lightflax_conv_bwd_w": "LfConvBwdW",
    "lightflax_bn_reduce": "LfBnReduce",
    "lightflax_bn_train": "LfBnTrain",
    "lightflax_bn_apply": "LfBnApply",
    "lightflax_bn_bwd_reduce": "LfBnBwdReduce",
    "lightflax_bn_bwd_apply": "LfBnBwdApply",
    "lightflax_bn_bwd": "LfBnBwd",
    "lightflax_pool_fwd": "LfPoolFwd",
    "lightflax_pool_bwd": "LfPoolBwd",
    "lightflax_dwconv_fwd": "LfDwConvFwd",
    "lightflax_dwconv_bwd": "LfDwConvBwd",
    "lightflax_dwconv_bwd_w": "LfDwConvBwdW",
}
_INT_FUNCS = ("lightflax_native_abi", "lightflax_native_dnnl_built", "lightflax_native_dnnl_runtime",
              "lightflax_native_get_threads", "lightflax_native_primitives", "lightflax_native_calls",
              "lightflax_native_time_ns", "lightflax_native_get_runtime", "lightflax_native_parallel_jobs")


class NativeLibrary:
    def __init__(self, lib: ctypes.CDLL, path: str):
        self.lib, self.path = lib, path
        for name in _INT_FUNCS:
            getattr(lib, name).restype = ctypes.c_int64
        lib.lightflax_native_calls.argtypes = [ctypes.c_int64]
        lib.lightflax_native_time_ns.argtypes = [ctypes.c_int64]
        lib.lightflax_native_set_threads.argtypes = [ctypes.c_int64]
        lib.lightflax_native_set_threads.restype = None
        lib.lightflax_native_reset_calls.restype = None
        lib.lightflax_native_counter_names.restype = ctypes.c_char_p

    @property
    def counter_names(self) -> tuple:
        """The handler kinds the library counts (calls, time), in its counter order."""
        return tuple(self.lib.lightflax_native_counter_names().decode().split(","))

    @property
    def dnnl_version(self) -> str:
        v = int(self.lib.lightflax_native_dnnl_runtime())
        return f"{v // 100}.{v % 100}"


def default_path() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        hits = sorted(glob.glob(os.path.join(here, "_lightflax_native" + suffix)))
        if hits:
            return hits[0]
    return None


def onednn_path() -> Optional[str]:
    """The installed onednn-cpu-gomp wheel's libdnnl.so.3, or None when that wheel is not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution(ONEDNN_WHEEL)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():  # RECORD paths are relative to site-packages ("../../libdnnl.so.3")
        if os.path.basename(str(f)) == ONEDNN_SONAME:
            path = os.path.normpath(os.path.abspath(dist.locate_file(f)))
            if os.path.exists(path):
                return path
    return None


def preload_onednn() -> Optional[str]:
    """Loads the wheel's libdnnl.so.3 (RTLD_LOCAL); -> None, or the problem (one line)."""
    path = onednn_path()
    if path is None:
        return f"the oneDNN runtime wheel {ONEDNN_WHEEL} (its {ONEDNN_SONAME}) is not installed"
    try:
        ctypes.CDLL(path)
    except OSError as e:
        return f"cannot load {ONEDNN_SONAME} from {ONEDNN_WHEEL}: {str(e).splitlines()[0]}"
    return None


def load():
    """-> (NativeLibrary or None, reason, warn_line or None)."""
    path = os.environ.get(ENV_LIB) or default_path()
    if path is None:
        return None, "native library not built (oneDNN or a C++ compiler was missing at install; " + HINT + ")", None
    missing = preload_onednn()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        why = f" ({missing})" if missing else ""
        return _broken(f"cannot load {os.path.basename(path)}: {str(e).splitlines()[0]}{why}")
    try:
        handle = NativeLibrary(lib, path)
        abi = int(lib.lightflax_native_abi())
        if abi != ABI_VERSION:
            return _broken(f"{os.path.basename(path)} has ABI {abi}, this lightflax needs {ABI_VERSION} (rebuild)")
        built, runtime = int(lib.lightflax_native_dnnl_built()), int(lib.lightflax_native_dnnl_runtime())
        if built // 100 != runtime // 100 or runtime < built:
            return _broken(f"built against oneDNN {built // 100}.{built % 100} but oneDNN "
                           f"{runtime // 100}.{runtime % 100} is loaded (rebuild)")
        capsules = {name: ctypes.cast(getattr(lib, sym), ctypes.c_void_p) for name, sym in TARGETS.items()}
    except AttributeError as e:
        return _broken(f"{os.path.basename(path)} lacks a symbol ({e}; rebuild)")
    import jax

    for name, sym in TARGETS.items():
        del capsules[name]
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, sym)), platform="cpu")
    return handle, f"oneDNN {handle.dnnl_version} kernels loaded from {os.path.basename(path)}", None


def _broken(problem: str):
    line = f"lightflax: native kernels disabled: {problem}; falling back to XLA's kernels"
    return None, problem, line


def warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
