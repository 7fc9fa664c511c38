"""Ctrl-C / SIGTERM are never lost (lightflax/interrupts.py): a signal that lands where an exception
would be dropped (a gc callback, a __del__) is recorded and raised at the next safe point; a run
interrupted at any moment ends 130 with the documented line."""

import gc
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, launch_env, run_launch

from lightflax import interrupts

LINE = "error: interrupted; resume with --resume"


@pytest.fixture
def handlers():
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook
    interrupts.reset()
    interrupts.install()
    yield
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])
    sys.unraisablehook = saved[2]
    interrupts.reset()


def _signal_and_spin(signum):
    os.kill(os.getpid(), signum)
    for _ in range(1000):  # bytecodes: the handler runs at one of them, inside this frame
        pass


def test_a_signal_inside_a_gc_callback_is_raised_at_the_next_safe_point(handlers):
    unraisable = []
    seen = []

    def callback(phase, info):  # as JAX's _xla_gc_callback: called by the collector, errors dropped
        if phase == "start" and not seen:
            seen.append(phase)
            _signal_and_spin(signal.SIGTERM)

    previous = sys.unraisablehook
    sys.unraisablehook = lambda info: (unraisable.append(info), previous(info))
    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    assert seen and interrupts.pending() == signal.SIGTERM
    assert not unraisable  # not raised inside the callback at all
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()


def test_outside_a_callback_the_handler_raises_at_once(handlers):
    with pytest.raises(KeyboardInterrupt):
        _signal_and_spin(signal.SIGINT)
    assert interrupts.pending() == signal.SIGINT


def test_an_interrupt_dropped_by_python_stays_quiet_and_recorded(handlers, capsys):
    class Finaliser:
        def __del__(self):
            raise KeyboardInterrupt  # what a handler outside our control could do in a __del__

    Finaliser()
    assert interrupts.pending() is not None
    assert "Exception ignored" not in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()


def test_a_signal_inside_a_deferred_section_is_raised_when_it_ends(handlers):
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            with interrupts.deferred():  # nested: only the outermost end raises
                _signal_and_spin(signal.SIGTERM)
                finished.append("inner")
            finished.append("outer")
    assert finished == ["inner", "outer"] and interrupts.pending() == signal.SIGTERM


def test_a_signal_during_an_import_is_recorded_and_raised_after_it(handlers, tmp_path, monkeypatch):
    """Raised inside an extension module's initialisation (jaxlib's nanobind modules run Python code
    there) a KeyboardInterrupt crashed the process (SIGSEGV/SIGABRT, not 130): inside the import
    machinery the handler only records; launch.py checks after its imports."""
    (tmp_path / "signals_itself.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nfor _ in range(1000):\n    pass\n"
        "FINISHED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import signals_itself
    except KeyboardInterrupt:
        pytest.fail("the handler raised inside the import")
    assert signals_itself.FINISHED and interrupts.pending() == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()


HELD_ACROSS_EXEC = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import launch
from lightflax import startup
if not os.environ.get("SECOND"):
    def reexec():  # a SIGTERM that comes during the re-execution
        os.kill(os.getpid(), signal.SIGTERM)
        os.environ["SECOND"] = "1"
        os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], sys.argv[1]])
    startup.reexec_if_useful = reexec
try:
    launch._start()
except KeyboardInterrupt:
    print("interrupted in the", "new" if os.environ.get("SECOND") else "old", "process")
    sys.exit(0)
print("lost")
"""


def test_a_signal_during_the_reexec_reaches_the_new_process():
    """launch.py's _start holds SIGINT/SIGTERM blocked across its re-execution (a signal handled in
    the old process would be lost at the exec) and unblocks them once the new process's handler is
    installed: the signal interrupts the new process."""
    code = HELD_ACROSS_EXEC.format(repo=str(REPO))
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTFLAX_HUGE_PAGES", "SECOND")}
    env["LIGHTFLAX_REUSE_ALLOC"] = "0"  # no real re-execution in the new process
    out = subprocess.run([sys.executable, "-c", code, code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "interrupted in the new process", out


def test_no_signal_no_raise():
    interrupts.reset()
    interrupts.check()
    assert interrupts.pending() is None


def _interrupted_run(tmp_path, args, marker, delay):
    """Starts launch.py, sends SIGTERM ``delay`` s after the first stdout line starting with
    ``marker``; returns (exit status, stderr)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(marker):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail("no exit 300 s after SIGTERM:\n" + err[-4000:])
    return proc.returncode, err


TINY = ["--experiment=xray_light", "--k=2", "--dataset=synthetic", "--image_size=16", "--synthetic_size=32",
        "--batch_size=8"]


@pytest.mark.parametrize("marker, delay, epochs", [
    ("kernels:", 0.0, 2),  # compilation (where JAX's gc callback runs most)
    ("kernels:", 0.5, 2),
    ("epoch 1/", 0.0, 50),  # training
    ("epoch 1/1", 0.0, 1),  # the final evaluation, export and exit
])
def test_sigterm_at_any_moment_ends_130_with_the_line(tmp_path, marker, delay, epochs):
    code, err = _interrupted_run(tmp_path, [*TINY, f"--epochs={epochs}", f"--workdir={tmp_path / 'w'}"],
                                 marker, delay)
    assert code == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == LINE, err[-3000:]
    assert "Exception ignored" not in err and "Traceback" not in err, err[-3000:]


# A randomized, bounded, seeded fault-injection check: a signal (SIGINT or SIGTERM) at a random
# moment of a run (argument parsing and start-up, data preparation, compilation, an epoch, a
# checkpoint write, the final evaluation and export) ends 130 with the line, and --resume then
# finishes a run equal to an uninterrupted one. The model is alive (checked), so a wrong restore
# of any layer would show in its metrics.
FAULT = [*TINY, "--epochs=3", "--steps_per_epoch=3"]
COMPARED = ("select_metrics", "test_accuracy", "test_loss", "epochs_run")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from lightflax import predict

    workdir = tmp_path_factory.mktemp("uninterrupted") / "w"
    run_launch([*FAULT, f"--workdir={workdir}"], check=0)
    spread = predict.prediction_spread(str(workdir))
    assert spread > 1e-6, f"the reference model is dead (probability spread {spread:.1e}): pick a live K/seed"
    return json.loads((workdir / "results.json").read_text())


def _signal_at_random(args, rng):
    """Starts launch.py; after a random marker line (or the start) and a random delay sends SIGINT or
    SIGTERM; returns (exit status, stderr, what was sent)."""
    signum = rng.choice([signal.SIGINT, signal.SIGTERM])
    marker = rng.choice([None, "data:", "kernels:", "epoch 1/", "epoch 2/"])
    delay = rng.uniform(0.0, 1.5)
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if marker is not None:
        for line in proc.stdout:
            if line.startswith(marker):
                break
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"no exit 300 s after {signal.Signals(signum).name}:\n" + err[-4000:])
    return proc.returncode, err, f"{signal.Signals(signum).name} {delay:.2f} s after {marker or 'the start'}"


@pytest.mark.parametrize("trial", range(3))
def test_a_signal_at_a_random_moment_ends_130_and_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted,
                                                                                    trial):
    workdir = tmp_path / "w"
    code, err, sent = _signal_at_random([*FAULT, f"--workdir={workdir}"], random.Random(2026_12_02 + trial))
    if code != 0:  # 0: the run had finished before the signal came
        assert code == 130, f"{sent}: exit {code}\n{err[-3000:]}"
        assert err.strip().splitlines()[-1] == LINE, f"{sent}\n{err[-3000:]}"
        assert "Exception ignored" not in err and "Traceback" not in err, f"{sent}\n{err[-3000:]}"
        run_launch([*FAULT, f"--workdir={workdir}", "--resume"], check=0)
    resumed = json.loads((workdir / "results.json").read_text())
    for key in COMPARED:
        assert resumed[key] == uninterrupted[key], (sent, key)


def test_predict_stops_at_the_next_batch_and_writes_nothing(tmp_path, monkeypatch):
    """A signal that comes while predict scores (recorded: raised at the next batch's safe point)
    ends the call with KeyboardInterrupt (launch.py: 130) and leaves no output file."""
    import numpy as np

    from lightflax import predict

    real = predict.probability_fn
    calls = []

    def counting(module, results):
        probs = real(module, results)

        def wrapped(v, x):
            calls.append(len(x))
            if len(calls) == 2:
                interrupts._pending = signal.SIGTERM  # a signal during the second batch
            return probs(v, x)
        return wrapped

    monkeypatch.setattr(predict, "probability_fn", counting)
    images = tmp_path / "in.npz"
    np.savez(images, images=np.zeros((40, 16, 16), np.uint8))
    interrupts.reset()
    try:
        with pytest.raises(KeyboardInterrupt):
            predict.predict_npz(str(REPO / "tests" / "data" / "run_v1"), str(images), str(tmp_path / "out.npz"),
                                batch_size=8)
    finally:
        interrupts.reset()
    assert len(calls) == 2 and not (tmp_path / "out.npz").exists()


def test_feature_extraction_stops_at_the_next_batch():
    import numpy as np

    from lightflax.pretrained import features

    calls = []

    class Backbone:
        name, variables, output_shape = "fake", None, (3,)

        def features_from_pixels(self, variables, batch):
            calls.append(batch.shape[0])
            interrupts._pending = signal.SIGINT  # a signal during this batch
            return np.zeros((batch.shape[0], 3), np.float32)

    interrupts.reset()
    try:
        with pytest.raises(KeyboardInterrupt):
            features.compute(Backbone(), np.zeros((20, 8, 8, 3), np.uint8), batch_size=4)
    finally:
        interrupts.reset()
    assert calls == [4]
