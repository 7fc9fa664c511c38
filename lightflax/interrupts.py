"""Ctrl-C (SIGINT) and SIGTERM that cannot be lost.

A signal handler that raises KeyboardInterrupt straight away can land inside a callback whose
exceptions Python reports as "Exception ignored" and drops: JAX's garbage-collection callback
(``gc.callbacks``), a ``__del__``, an atexit function. The run then carries on and ends 0.
Here the handler first RECORDS the signal, and raises only when the current frame stack holds no
such callback; a recorded signal surfaces at the next safe point (:func:`check`, called at the
training loop's step and epoch boundaries, data preparation, feature extraction, predict batches,
and by launch.py after the experiment returns). A KeyboardInterrupt that still ends up as
"unraisable" is kept quiet (it is recorded; the next check raises it).

The handler also only records while a module is being imported: an exception raised inside an
extension module's initialisation (jaxlib's nanobind modules run Python code there) ended the
process with SIGSEGV or SIGABRT instead of 130 (SIGTERM 0.3-0.9 s after launch: 3 of 30 runs of
benchmarks/signal_at_random.py, 2026-12-03). launch.py calls :func:`check` after its imports.

Only the entry point calls :func:`install`; the library only calls :func:`check`, which costs a
global read when no signal came.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import sys
import threading
from typing import Iterator, Optional

# The signal recorded (written only by the handler, in the main thread) and, apart from it, a stop
# that the program requested of its own threads: a stop can never overwrite or clear a signal.
_pending: Optional[int] = None
_stop_requested = False
_previous_unraisablehook = None
_deferring = 0  # threads inside a deferred() section (changed under _lock; the handler only reads it)
_lock = threading.Lock()  # never taken by the handler: it runs on the main thread, which may hold it


def pending() -> Optional[int]:
    """The number of the signal recorded and not yet cleared, :data:`STOP` when only a stop was
    requested, or None."""
    if _pending is not None:
        return _pending
    return STOP if _stop_requested else None


def check() -> None:
    """A safe point: raise KeyboardInterrupt if a signal was recorded or a stop requested."""
    if _pending is not None or _stop_requested:
        raise KeyboardInterrupt


STOP = -1  # not a signal: the program asked its other threads to stop (request_stop)


def request_stop() -> bool:
    """Makes every thread's next :func:`check` raise KeyboardInterrupt, as a signal would (a study's
    other rows, when one row failed); returns False when a real signal is already pending."""
    global _stop_requested
    _stop_requested = True
    return _pending is None


def clear_stop() -> None:
    """Forgets a :func:`request_stop` (a real signal recorded before or since stays)."""
    global _stop_requested
    _stop_requested = False


def reset() -> None:
    """Forget a recorded signal (tests)."""
    global _pending, _deferring, _stop_requested
    with _lock:
        _pending, _stop_requested, _deferring = None, False, 0


def _unsafe_codes() -> set:
    return {getattr(cb, "__code__", None) for cb in gc.callbacks} - {None}


def in_callback(frame) -> bool:
    """True when ``frame`` or a caller is a gc callback or a ``__del__`` (an exception raised there
    would be printed as "Exception ignored" and dropped), or the import machinery (an exception
    raised through an extension module's initialisation can crash the process)."""
    codes = _unsafe_codes()
    while frame is not None:
        code = frame.f_code
        if code in codes or code.co_name == "__del__" or code.co_filename.startswith("<frozen importlib."):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A critical section (a checkpoint write): a signal that comes inside it is only recorded and
    raised when the section ends, so the write completes (or fails) whole. Interrupting Orbax
    mid-write left its writer threads scheduling work on a shutting-down interpreter: tracebacks
    after the one-line message, and a half-written step."""
    global _deferring
    with _lock:
        _deferring += 1
    try:
        yield
    finally:
        with _lock:
            _deferring -= 1
    if not _deferring:
        check()


def record(signum: int, frame=None) -> None:
    """The signal handler: record, and raise KeyboardInterrupt unless inside a callback or a
    :func:`deferred` section."""
    global _pending
    _pending = signum
    if not _deferring and not in_callback(frame):
        raise KeyboardInterrupt


def _unraisable(info) -> None:
    global _pending
    if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
        if _pending is None:
            _pending = signal.SIGINT
        return
    (_previous_unraisablehook or sys.__unraisablehook__)(info)


def install() -> None:
    """SIGINT and SIGTERM both go through :func:`record`; swallowed interrupts stay quiet."""
    global _previous_unraisablehook
    signal.signal(signal.SIGINT, record)
    signal.signal(signal.SIGTERM, record)
    if sys.unraisablehook is not _unraisable:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _unraisable
