"""Large freed blocks reused instead of faulted in again: the preloaded layer under malloc.

XLA:CPU allocates every buffer of a compiled step (outputs, and one block for all temporaries)
with malloc on every execution and frees it after; glibc hands such blocks back to the system
and the next step faults their pages in again, 4 KiB at a time, each zeroed by the kernel.
Measured (docs/native.md, "Page faults and the reuse layer"): one thread, batch 32, 224x224,
140,000 minor faults and ~330 ms of kernel time in a Conv2D step of ~1,230 CPU-ms.

``lightflax/native/csrc/alloc/reuse.c`` (built by ``pip install`` beside the native kernels,
plain C, no dependencies) serves blocks of 256 KiB and more from pages it keeps: a freed block is
reused for the next request of the same size. The pages it holds never exceed the most that was
live at once, so the peak does not grow (a request for a size whose block is still live waits a
few milliseconds for its free, then goes to glibc; see the C source). Everything smaller is
glibc's, untouched.

malloc can only be replaced when a process starts, so the entry points (``launch.py``, the
benchmark workers) call :func:`lightflax.startup.reexec_if_useful` first: it re-executes the
same command once with the layer in ``LD_PRELOAD``. ``LIGHTFLAX_REUSE_ALLOC=0`` turns it off
(both the re-execution and the layer, which then passes everything to glibc).
"""

from __future__ import annotations

import ctypes
import glob
import os
from typing import Dict, Mapping, Optional

ENV_SWITCH = "LIGHTFLAX_REUSE_ALLOC"
_NATIVE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
_STATS = ("hits", "misses", "evictions", "passed", "live_bytes", "cached_bytes", "peak_bytes", "live_blocks",
          "waits", "waited_hits")


def library_path() -> Optional[str]:
    """The built layer (``lightflax/native/_lightflax_reuse_alloc*.so``), or None if it was not built."""
    found = sorted(glob.glob(os.path.join(_NATIVE_DIR, "_lightflax_reuse_alloc*.so")))
    return found[0] if found else None


def switched_off(environ: Mapping[str, str]) -> bool:
    return environ.get(ENV_SWITCH, "1").strip() == "0"


def preload_to_use(environ: Mapping[str, str], path: Optional[str]) -> Optional[str]:
    """The ``LD_PRELOAD`` value to re-execute with, or None to leave the process as it is."""
    if path is None or switched_off(environ):
        return None
    current = environ.get("LD_PRELOAD", "")
    if path in current.replace(":", " ").split():  # preloaded already (by us or the user): never loop
        return None
    return f"{path} {current}".strip()


def _symbols():
    try:
        process = ctypes.CDLL(None)
        return process.lightflax_reuse_alloc_stats, process.lightflax_reuse_alloc_enabled
    except (AttributeError, OSError):
        return None


def active() -> bool:
    """Whether this process runs with the layer preloaded and switched on."""
    symbols = _symbols()
    return bool(symbols and symbols[1]())


def stats() -> Optional[Dict[str, int]]:
    """The layer's counters in this process (None without the layer)."""
    symbols = _symbols()
    if symbols is None:
        return None
    out = (ctypes.c_uint64 * len(_STATS))()
    symbols[0](out)
    return dict(zip(_STATS, (int(v) for v in out)))


def status() -> Dict[str, str]:
    """``{"allocator": "reuse" | "malloc", "reason": ...}`` for logs and results.json."""
    if active():
        return {"allocator": "reuse", "reason": "large blocks reused (lightflax/native/csrc/alloc/reuse.c preloaded)"}
    if switched_off(os.environ):
        return {"allocator": "malloc", "reason": f"{ENV_SWITCH}=0"}
    if library_path() is None:
        return {"allocator": "malloc", "reason": "the reuse layer was not built (no C compiler at install)"}
    return {"allocator": "malloc", "reason": "not preloaded (the entry point did not re-execute with it)"}
