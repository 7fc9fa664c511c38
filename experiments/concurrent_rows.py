"""A study's rows trained a few at a time in one process (xray_compare --concurrent_rows=N).

    outcomes = concurrent_rows.run(train_one, len(rows), workers=2, labels=[...])

Each row runs on its own thread; XLA runs the rows' compiled steps at the same time (the GIL is
released while a step runs) and the native kernels use one thread per call, so two rows keep two
cores busy where one row's small steps cannot. Every console line a row prints is prefixed with
its label (``[LightLayers K=3] epoch 4/20 ...``); per-step bars are off (two would overwrite each
other). The first error of a row, or Ctrl-C/SIGTERM, stops the other rows at their next step
(lightflax.interrupts) and is raised once every row has stopped: a signal ends the study 130 and
each row resumes from its own checkpoint; an error keeps its one line and exit status.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import sys
import threading
from typing import Any, Callable, Iterator, List, Sequence

from lightflax import interrupts, native, progress


class _LabelledStdout(io.TextIOBase):
    """sys.stdout for several row threads: whole lines, each prefixed with its thread's label."""

    def __init__(self, real):
        self.real, self._local, self._lock = real, threading.local(), threading.Lock()

    def label(self, text) -> None:
        self._local.label, self._local.buf = text, ""

    def write(self, s: str) -> int:
        label = getattr(self._local, "label", None)
        if label is None:
            with self._lock:
                return self.real.write(s)
        *lines, self._local.buf = (self._local.buf + s).split("\n")
        if lines:
            with self._lock:
                self.real.write("".join(f"[{label}] {line}\n" for line in lines))
        return len(s)

    def close_label(self) -> None:
        rest = getattr(self._local, "buf", "")
        if rest:
            self.write("\n")
        self._local.label = None

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return False  # no bars from row threads

    def fileno(self) -> int:
        return self.real.fileno()


@contextlib.contextmanager
def _one_native_thread() -> Iterator[None]:
    before = native.threads()
    if before is not None:
        native.set_threads(1)
    try:
        yield
    finally:
        if before is not None:
            native.set_threads(before)


def run(fn: Callable[[int], Any], n: int, workers: int, labels: Sequence[str]) -> List[Any]:
    """``[fn(0), ..., fn(n - 1)]`` on ``workers`` threads, started in order; raises the first row's
    error (or the KeyboardInterrupt of a signal) after every started row has stopped."""
    out: List[Any] = [None] * n
    stdout = _LabelledStdout(sys.stdout)
    mode = progress.mode()
    if progress.bars_enabled():
        progress.set_mode("epochs")

    def labelled(i: int) -> Any:
        interrupts.check()  # a row does not start once another failed or a signal came
        stdout.label(labels[i])
        try:
            return fn(i)
        except BaseException:
            interrupts.request_stop()  # before this thread can take the next row
            raise
        finally:
            stdout.close_label()

    real, sys.stdout = sys.stdout, stdout
    try:
        with _one_native_thread(), concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(labelled, i): i for i in range(n)}
            try:
                for f in concurrent.futures.as_completed(futures):
                    out[futures[f]] = f.result()
            except BaseException:
                interrupts.request_stop()  # the other rows stop at their next step (a signal stays recorded)
                for f in futures:
                    f.cancel()
                concurrent.futures.wait(futures)
                interrupts.clear_stop()
                raise
    finally:
        sys.stdout = real
        progress.set_mode(mode)
    return out
