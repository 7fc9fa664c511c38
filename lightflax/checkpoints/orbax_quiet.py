"""Keeping Orbax and TensorStore to our one-line CheckpointError.

Orbax logs every save at INFO, its writer threads log each failed write with a traceback, and
TensorStore's C++ threads print to file descriptor 2; after a failed read or write, abandoned
coroutines and tasks print more at garbage collection. These helpers quiet exactly that noise
(:func:`quiet`, :class:`CapturedStderr`, the two ``silence_*`` filters, :func:`join_threads`) and
turn the exception into one line (:func:`one_line`, :func:`read_reason`, :func:`write_reason`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Any, Iterable, Iterator

from absl import logging as absl_logging


def one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_reason(e: BaseException) -> str:
    """One line saying why Orbax/TensorStore failed (the root cause when the top is generic)."""
    while "See full TensorStore details" in str(e) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    if "See full TensorStore details" in str(e):
        return "an array file cannot be read"
    return one_line(e)


def write_reason(e: BaseException) -> str:
    """One line saying why a save failed; a full disk is named as such, whatever layer noticed it."""
    seen = e
    while seen is not None:
        if getattr(seen, "errno", None) == 28 or "No space left on device" in str(seen):
            return "No space left on device"
        seen = seen.__cause__ or seen.__context__
    return one_line(e)


def _is_failed_read_leftover(unraisable: Any) -> bool:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    return getattr(unraisable.object, "__qualname__", "").endswith("_read_array_index_and_device_put")


class _UnraisableFilter:
    """sys.unraisablehook that drops the leftovers of a failed Orbax read, passes on the rest."""

    def __init__(self, previous: Any):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        if not _is_failed_read_leftover(unraisable):
            self.previous(unraisable)


def silence_failed_read_leftovers() -> None:
    """Keeps a failed restore to our one line.

    When one array of a damaged checkpoint fails to read, Orbax abandons the
    other read coroutines, and TensorStore reads still in flight later call
    back into Orbax's closed event loop. Python would print each of these
    ("Exception ignored in: <coroutine ...>" / "RuntimeError: Event loop is
    closed") after our one-line error, at garbage collection or at exit. This
    installs (once) an unraisable hook that drops exactly those two kinds and
    collects the abandoned coroutines now.
    """
    if not isinstance(sys.unraisablehook, _UnraisableFilter):
        sys.unraisablehook = _UnraisableFilter(sys.unraisablehook)
    gc.collect()


class _DropAbandonedTasks(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" reports (with their tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in str(record.msg).split("\n", 1)[0]


def silence_failed_write_leftovers() -> None:
    """Keeps a failed save (disk full, permissions) to our one line.

    Orbax writes each array in its own asyncio task; when one write fails the
    others are abandoned, and asyncio logs each one's exception with a traceback
    when it is garbage collected ("Future exception was never retrieved"), dozens
    of them after our one-line error. This filters exactly that message from the
    asyncio logger (once) and collects the abandoned tasks now.
    """
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedTasks) for f in log.filters):
        log.addFilter(_DropAbandonedTasks())
    silence_failed_read_leftovers()


def join_threads(threads: Iterable[threading.Thread], timeout: float) -> None:
    """Waits (``timeout`` seconds at most, in all) for ``threads`` to end: the threads a failed Orbax
    save left running, which report their own failures when they end."""
    deadline = time.monotonic() + timeout
    for t in threads:
        if t is not threading.current_thread() and t.is_alive():
            t.join(max(0.0, deadline - time.monotonic()))


class CapturedStderr:
    """Captures file descriptor 2 (also C++ threads' prints) while active; what was captured
    is passed on to stderr at the end unless :meth:`drop` was called (a failed save, whose
    one-line error replaces the noise). Re-entrant in sequence, not nested."""

    def __init__(self):
        self._file = tempfile.TemporaryFile()
        self._dropped = False

    def __enter__(self):
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        if not self._dropped and exc[0] is None:
            self._replay()
        else:
            self._file.seek(0), self._file.truncate()
        return False

    def _replay(self):
        self._file.seek(0)
        text = self._file.read()
        self._file.seek(0), self._file.truncate()
        if text:
            sys.stderr.write(text.decode(errors="replace"))
            sys.stderr.flush()

    def drop(self):
        """From now on, what is captured is discarded."""
        self._dropped = True


@contextlib.contextmanager
def quiet(level: int = absl_logging.WARNING) -> Iterator[None]:
    """Raises absl's verbosity to ``level`` while Orbax runs (it logs every save at INFO).

    Reading uses ERROR: Orbax's warnings about unreadable items are replaced
    by our one-line CheckpointError.
    """
    old = absl_logging.get_verbosity()
    if old > level:
        absl_logging.set_verbosity(level)
    try:
        yield
    finally:
        absl_logging.set_verbosity(old)
