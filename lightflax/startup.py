"""What an entry point must set before the process starts its real work: one re-execution.

Two process-wide settings can only be made when a program starts, before any thread or large
allocation exists:

- the large-block reuse layer under malloc (``LD_PRELOAD``; lightflax/reuse_alloc.py, ON by
  default, ``LIGHTFLAX_REUSE_ALLOC=0`` turns it off);
- transparent huge pages for malloc's large blocks (``GLIBC_TUNABLES``; lightflax/huge_pages.py,
  opt-in with ``LIGHTFLAX_HUGE_PAGES=1``).

:func:`reexec_if_useful` re-executes the running program once (same pid, arguments,
interpreter options and open files) with whichever of them applies, and does nothing otherwise.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Mapping, Optional, Sequence

from lightflax import huge_pages, reuse_alloc


def changes(environ: Mapping[str, str]) -> Dict[str, str]:
    """The environment variables to re-execute with (empty: nothing to do)."""
    out = {}
    tunables = huge_pages.tunables_to_use(environ, huge_pages._glibc_version(), huge_pages._thp_mode())
    if tunables is not None:
        out["GLIBC_TUNABLES"] = tunables
    preload = reuse_alloc.preload_to_use(environ, reuse_alloc.library_path())
    if preload is not None:
        out["LD_PRELOAD"] = preload
    return out


def reexec_if_useful(argv: Optional[Sequence[str]] = None) -> None:
    """Re-executes this program with the settings above when any applies (never twice).

    Call it first in an entry point. ``argv``: the full command line to re-run (default
    ``sys.orig_argv``: interpreter options included). If the re-execution fails the program
    carries on as it is.
    """
    if not sys.platform.startswith("linux"):
        return
    todo = changes(os.environ)
    if not todo:
        return
    args = list(argv if argv is not None else getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    previous = {k: os.environ.get(k) for k in todo}
    os.environ.update(todo)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, args)
    except OSError:  # could not re-execute: carry on as we are
        for k, v in previous.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
