"""Transparent huge pages for the process's large allocations: OPT-IN (``LIGHTFLAX_HUGE_PAGES=1``).

XLA:CPU allocates a compiled step's temporaries and outputs with ``malloc`` for every
execution, and glibc serves every block over 32 MiB (its largest mmap threshold) with a
fresh ``mmap``: each step then faults in every page of its temporaries again, 4 KiB at a
time. Measured (docs/native.md, "Page faults"; 2-core dev machine, 2026-11-30): xray_light K=5
at 224², batch 64, ~400,000 minor page faults and ~0.9 CPU-s of kernel time per step; with
glibc's ``glibc.malloc.hugetlb=1`` tunable (malloc asks for transparent huge pages) ~2,000
faults, and the step 1.5x faster (xray_conv2d at 128²: 1.3x), peak RSS unchanged, in runs of
one process at a time. In interleaved runs of several processes on the same (virtual) machine
the result went both ways (1.26x faster at 224², and slower at every size in another run), so
it is not the default: docs/native.md, attempt 8.

glibc reads tunables only when a process starts, so :func:`lightflax.startup.reexec_if_useful`
re-executes the running program with the tunable added, before anything else has run, when
``LIGHTFLAX_HUGE_PAGES=1``. :func:`tunables_to_use` says nothing to do (and never loops)
otherwise, when the tunable is already set, or when the system cannot use it (glibc < 2.35,
transparent huge pages ``never`` or already ``always``). Since the large-block reuse layer
(lightflax/reuse_alloc.py, on by default) the steps fault almost no pages in: this switch
matters only with that layer off.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

ENV_SWITCH = "LIGHTFLAX_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb=1"
THP_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> Optional[tuple]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def _thp_mode() -> Optional[str]:
    try:
        with open(THP_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def tunables_to_use(environ: Mapping[str, str], glibc: Optional[tuple], thp_mode: Optional[str]) -> Optional[str]:
    """The GLIBC_TUNABLES value to re-execute with, or None to leave the process as it is."""
    if environ.get(ENV_SWITCH, "0").strip() != "1":
        return None  # opt-in
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:  # set already (by us or by the user): never loop
        return None
    if glibc is None or glibc < (2, 35) or thp_mode != "madvise":
        return None  # the tunable is unknown, or huge pages are off ("never") or on anyway ("always")
    return f"{current}:{TUNABLE}" if current else TUNABLE
