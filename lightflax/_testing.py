"""Test support: the one switch of the library that a test sets in a CHILD process's environment.

Nothing here changes a result. :data:`FAULT_KILL_ENV`, when set to N, makes the training loop
SIGKILL its own process after N training steps of the run (counting from step 0 of epoch 0), so
the resume-after-kill tests and ``benchmarks/fault_injection.py`` can interrupt a real run at a
known step. Unset (always, outside those tests) :func:`fault_hook` returns None and the loop
calls nothing.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Optional

FAULT_KILL_ENV = "LIGHTFLAX_FAULT_KILL_AFTER_STEP"


def fault_hook() -> Optional[Callable[[int], None]]:
    """The hook of :data:`FAULT_KILL_ENV` (None when unset): called after each global step."""
    value = os.environ.get(FAULT_KILL_ENV)
    if not value:
        return None
    kill_after = int(value)

    def hook(global_step: int) -> None:
        if global_step + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
