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

glibc reads tunables only when a process starts, so :func:`reexec_if_useful` re-executes the
running program (same pid, arguments, interpreter options and open files) with the tunable
added, before anything else has run, when ``LIGHTFLAX_HUGE_PAGES=1``. It does nothing (and never
loops) otherwise, when the tunable is already set, or when the system cannot use it (not Linux,
glibc < 2.35, transparent huge pages ``never`` or already ``always``).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

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


def reexec_if_useful(argv: Optional[Sequence[str]] = None) -> None:
    """Re-executes this program with ``glibc.malloc.hugetlb=1`` when asked to and possible (above).

    Call it first in an entry point, before threads or large allocations exist. ``argv``:
    the full command line to re-run (default ``sys.orig_argv``: interpreter options included).
    """
    if not sys.platform.startswith("linux"):
        return
    value = tunables_to_use(os.environ, _glibc_version(), _thp_mode())
    if value is None:
        return
    args = list(argv if argv is not None else getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    previous = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = value
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, args)
    except OSError:  # could not re-execute: carry on as we are, without huge pages
        if previous is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = previous
