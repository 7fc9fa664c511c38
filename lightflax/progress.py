"""Console progress: a per-step bar on a terminal, one line per epoch elsewhere.

    progress.set_mode("auto")                  # the entry layer, once (--progress, --verbosity)
    with progress.bar(steps, "epoch 3/20") as b:
        for ...:
            b.update(loss=lambda: float(m["loss"].mean()))   # read only when the bar redraws
    progress.epoch_line("epoch 3/20 ...")        # printed in every mode but quiet

Modes: ``auto`` (bars when stdout is a terminal, else epoch lines only), ``bars``
(always, e.g. a test that reads them), ``epochs`` (epoch lines only), ``quiet``
(neither). The environment variable ``LIGHTFLAX_PROGRESS`` sets the initial mode.
The bars are tqdm's (steps/s, ETA); the running loss is a callable so that a
value on the device is copied to the host only when the bar is redrawn (at most a
few times a second), never once per step.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator, Optional, Union

MODES = ("auto", "bars", "epochs", "quiet")
_mode = os.environ.get("LIGHTFLAX_PROGRESS", "auto")


def set_mode(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def mode() -> str:
    return _mode


def bars_enabled() -> bool:
    if _mode == "bars":
        return True
    return _mode == "auto" and sys.stdout.isatty()


def epoch_lines_enabled() -> bool:
    return _mode != "quiet"


def epoch_line(text: str) -> None:
    """One line per epoch (and other per-phase lines); kept clear of a running bar."""
    if epoch_lines_enabled():
        print(text, flush=True)


Loss = Union[None, float, Callable[[], float]]


class Bar:
    """A tqdm bar, or nothing when bars are off (every method is then a no-op)."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "step", min_redraw_s: float = 0.25):
        self._bar = None
        self._min_redraw_s = min_redraw_s
        self._last = 0.0
        if bars_enabled():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stdout, dynamic_ncols=True,
                             mininterval=min_redraw_s, smoothing=0.1)

    def update(self, n: int = 1, loss: Loss = None) -> None:
        if self._bar is None:
            return
        self._bar.update(n)
        now = time.monotonic()
        if loss is not None and (now - self._last >= self._min_redraw_s or self._bar.n == self._bar.total):
            self._last = now
            value = loss() if callable(loss) else loss
            self._bar.set_postfix_str(f"loss {value:.4f}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.refresh()  # the final count, rate and loss (a bar with leave=False then clears)
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def bar(total: Optional[int], desc: str, unit: str = "step") -> Iterator[Bar]:
    b = Bar(total, desc, unit)
    try:
        yield b
    finally:
        b.close()


@contextlib.contextmanager
def phase(total: Optional[int], desc: str, unit: str = "step") -> Iterator[Bar]:
    """A long phase (feature extraction): a bar on a terminal; otherwise a line when it starts
    and one when it ends, so a log is never silent for minutes."""
    quiet_log = not bars_enabled() and epoch_lines_enabled()
    t0 = time.perf_counter()
    if quiet_log:
        print(f"{desc}: {total} {unit}es ..." if unit.endswith("ch") else f"{desc}: {total} {unit}s ...", flush=True)
    with bar(total, desc, unit) as b:
        yield b
    if quiet_log:
        print(f"{desc}: done in {time.perf_counter() - t0:.1f} s", flush=True)


@contextlib.contextmanager
def task(desc: str) -> Iterator[None]:
    """A phase without steps (data loading, preparation): '<desc> ...' then '<desc>: N.N s' on a terminal."""
    if not bars_enabled():
        yield
        return
    print(f"{desc} ...", end="", flush=True)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        print(f" {time.perf_counter() - t0:.1f} s", flush=True)


def _clock(seconds: float) -> str:
    """m:ss (h:mm:ss from an hour on)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Study:
    """One view of a study of several rows, next to the rows' own bars: at each row's start a line
    ``row i/N <name>  elapsed m:ss  ETA m:ss`` (on a terminal with a text bar of the rows done), and
    ``study: N rows in m:ss`` at the end. The ETA is the steps left (each row's epochs x steps per
    epoch) divided by the rate measured on the rows done (their steps over their wall time,
    compilation included); before a row has finished it is ``?``. With ``workers`` rows at a time
    the work left is shared among them (their rate is each row's own, measured while contended).

        study = progress.Study([("LightLayers K=1", 20 * 73), ...])
        for i, row in enumerate(rows):
            study.start(i)
            ...                                   # train the row
            study.done(i)
        study.finish()
    """

    def __init__(self, rows, clock: Callable[[], float] = time.monotonic, width: int = 20, workers: int = 1):
        self.names, self.steps = [n for n, _ in rows], [int(s) for _, s in rows]
        self._clock, self._width = clock, width
        self.workers = workers  # rows trained at the same time: the ETA divides the work left among them
        self.t0 = clock()
        self.wall_s: list = [None] * len(rows)
        self._row_t0: dict = {}

    def elapsed(self) -> float:
        return self._clock() - self.t0

    def eta(self, i: int) -> Optional[float]:
        """Seconds left for rows i.. (None before any row finished)."""
        done = [k for k, w in enumerate(self.wall_s) if w is not None and self.steps[k]]
        seconds = sum(self.wall_s[k] for k in done)
        if not done or seconds <= 0:
            return None
        rate = sum(self.steps[k] for k in done) / seconds
        left = [k for k in range(i, len(self.steps)) if self.wall_s[k] is None]
        return sum(self.steps[k] for k in left) / rate / max(1, min(self.workers, len(left)))

    def line(self, i: int, bar: bool = False) -> str:
        eta = self.eta(i)
        n = len(self.names)
        text = (f"row {i + 1}/{n} {self.names[i]}  elapsed {_clock(self.elapsed())}  "
                f"ETA {'?' if eta is None else _clock(eta)}")
        if bar:
            filled = self._width * i // n
            text = f"[{'#' * filled}{'.' * (self._width - filled)}] " + text
        return text

    def start(self, i: int) -> None:
        self._row_t0[i] = self._clock()
        epoch_line(self.line(i, bar=bars_enabled()))

    def done(self, i: int, skipped: bool = False) -> float:
        """Records row i's wall time (since its start); returns it. A skipped row (it stopped before
        training) leaves the rate alone."""
        self.wall_s[i] = self._clock() - self._row_t0.pop(i)
        if skipped:
            self.steps[i] = 0
        return self.wall_s[i]

    def finish(self) -> float:
        """Prints and returns the study's wall time so far."""
        total = self.elapsed()
        ran = sum(w is not None for w in self.wall_s)
        epoch_line(f"study: {ran}/{len(self.names)} rows in {_clock(total)} ({total:.1f} s)")
        return total
