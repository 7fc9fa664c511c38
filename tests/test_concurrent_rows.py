"""xray_compare's rows a few at a time (experiments/concurrent_rows.py): results in row order, every
line labelled with its row, the first error stops the other rows at their next safe point."""

import threading
import time

import pytest

from experiments import concurrent_rows
from lightflax import interrupts, native
from lightflax.errors import UserError


@pytest.fixture(autouse=True)
def _clean():
    interrupts.reset()
    yield
    interrupts.reset()


def test_outcomes_come_in_row_order_and_lines_carry_their_row(capsys):
    both_running = threading.Barrier(2, timeout=30)
    threads = []

    def row(i):
        print(f"start {i}", flush=True)
        if i < 2:
            both_running.wait()  # rows 0 and 1 really run at the same time
        threads.append(native.threads())
        print(f"end {i}", end="")  # a last line without its newline is still written whole
        return i * 10

    assert concurrent_rows.run(row, 3, workers=2, labels=["a", "b", "c"]) == [0, 10, 20]
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == sorted(f"[{x}] {w} {i}" for i, x in enumerate("abc") for w in ("start", "end"))
    if native.threads() is not None:
        assert set(threads) == {1}  # one native thread per call while rows share the cores


def test_a_row_error_stops_the_others_at_their_next_check_and_is_raised(capsys):
    stopped = []

    def row(i):
        if i == 0:
            time.sleep(0.2)
            raise UserError("row 0 is wrong")
        try:
            for _ in range(3000):  # a training loop: a safe point per step
                interrupts.check()
                time.sleep(0.01)
        except KeyboardInterrupt:
            stopped.append(i)
            raise
        return i

    with pytest.raises(UserError, match="row 0 is wrong"):
        concurrent_rows.run(row, 3, workers=2, labels=["a", "b", "c"])
    assert stopped == [1]  # row 1 stopped inside its loop (not after it); row 2 never started
    assert interrupts.pending() is None  # the stop request is not mistaken for a signal afterwards


def test_a_signal_stops_every_row_and_ends_as_an_interrupt():
    import signal

    finished = []

    def row(i):
        if i == 1:
            time.sleep(0.2)
            with interrupts.deferred():  # SIGINT during a checkpoint write: recorded, raised after it
                interrupts.record(signal.SIGINT, None)
        for _ in range(3000):
            interrupts.check()
            time.sleep(0.01)
        finished.append(i)
        return i

    with pytest.raises(KeyboardInterrupt):
        concurrent_rows.run(row, 2, workers=2, labels=["a", "b"])
    assert finished == []  # both rows stopped inside their loops
    assert interrupts.pending() == signal.SIGINT  # the real signal stays recorded: launch.py ends 130
