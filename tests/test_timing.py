"""Tests for lightflax.timing: statistics, AOT compile and cost analysis, clock discipline, traces.

No assertion here depends on how fast anything runs: clock discipline is
checked with a fake clock that records the order of events.
"""

import glob
import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightflax import timing
from lightflax.errors import UserError


def test_summarize_matches_numpy():
    x = np.random.default_rng(0).exponential(size=37)
    s = timing.summarize(x.tolist())
    assert s["n"] == 37
    np.testing.assert_allclose(
        [s["median"], s["p10"], s["p90"], s["mean"], s["std"], s["min"], s["max"]],
        [np.median(x), np.percentile(x, 10), np.percentile(x, 90), x.mean(), x.std(), x.min(), x.max()],
    )
    s = timing.summarize([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert (s["median"], s["p10"], s["p90"]) == pytest.approx((5.5, 1.9, 9.1))


def test_summarize_empty():
    s = timing.summarize([])
    assert s["n"] == 0 and s["median"] is None and s["p90"] is None


def test_aot_compile_matmul_costs_and_memory():
    m, k, n = 64, 128, 32
    f = jax.jit(lambda x, w: jnp.tanh(x @ w))
    x = jax.random.normal(jax.random.key(0), (m, k))
    w = jax.random.normal(jax.random.key(1), (k, n))
    step = timing.aot_compile(f, x, w)
    assert step.lower_s >= 0 and step.compile_s >= 0
    np.testing.assert_array_equal(np.asarray(step(x, w)), np.asarray(f(x, w)))
    # XLA counts a multiply-add as 2 FLOPs: 2*m*k*n for the dot (tanh is a transcendental).
    assert 2 * m * k * n <= step.flops <= 1.01 * 2 * m * k * n
    assert step.cost["flops"] == step.flops
    # At least the inputs are read and the output written, float32.
    assert step.bytes_accessed >= 4 * (m * k + k * n + m * n)
    if step.memory is None:
        pytest.skip(f"{jax.default_backend()} gives no memory analysis")
    assert step.memory["argument_bytes"] == 4 * (m * k + k * n)
    assert step.memory["output_bytes"] == 4 * m * n


def test_aot_compiled_rejects_other_shapes():
    f = jax.jit(lambda x: x * 2)
    step = timing.aot_compile(f, jnp.ones((4,)))
    with pytest.raises(TypeError):
        step(jnp.ones((5,)))


def test_aot_compile_needs_jit():
    with pytest.raises(TypeError, match="jax.jit"):
        timing.aot_compile(lambda x: x, jnp.ones(3))


class _FakeCompiled:
    def __init__(self, cost=None, raises=False):
        self._cost, self._raises = cost, raises

    def cost_analysis(self):
        if self._raises:
            raise NotImplementedError("no cost analysis on this backend")
        return self._cost

    def memory_analysis(self):
        if self._raises:
            raise NotImplementedError
        return None


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"flops": 10.0, "bytes accessed": 4.0}, {"flops": 10.0, "bytes accessed": 4.0}),
        ([{"flops": 10.0}, {"flops": 5.0, "bytes accessed": 2.0}], {"flops": 15.0, "bytes accessed": 2.0}),
        (None, {}),
        ([], {}),
    ],
)
def test_cost_analysis_formats(raw, expected):
    assert timing.cost_analysis(_FakeCompiled(raw)) == expected


def test_cost_and_memory_analysis_unavailable():
    fake = _FakeCompiled(raises=True)
    assert timing.cost_analysis(fake) == {}
    assert timing.memory_analysis(fake) is None
    assert timing.memory_analysis(_FakeCompiled()) is None


class _Clock:
    """Fake perf_counter that logs reads; returns preset times."""

    def __init__(self, times, log):
        self.times, self.log = list(times), log

    def __call__(self):
        self.log.append("clock")
        return self.times.pop(0)


@pytest.fixture
def fake_clock(monkeypatch):
    """install(times) -> (clock, log): a fake clock for StepTimer(clock=...) and a log of clock reads and
    syncs. The clock is injected, not patched into `time`: JAX's compilation cache and file locks read
    time.perf_counter too, and must not consume the preset times."""
    log = []

    def install(times):
        clock = _Clock(times, log)
        real_sync = timing.sync

        def logging_sync(tree):
            log.append(("sync", tree))
            return real_sync(tree)

        monkeypatch.setattr(timing, "sync", logging_sync)
        return clock, log

    return install


def test_step_timer_syncs_before_every_clock_read(fake_clock):
    # Step durations 5 (warm-up), 1, 2, 3 seconds on the fake clock.
    clock, log = fake_clock([0, 5, 10, 11, 20, 22, 30, 33])
    timer = timing.StepTimer(warmup=1, clock=clock)
    calls = []

    def fn(x):
        calls.append(len(log))
        log.append("call")
        return x + 1

    x = jnp.zeros(())
    for _ in range(4):
        x = timer.run(fn, x)
    assert float(x) == 4.0
    # Per step: sync(inputs), clock, call, sync(outputs), clock.
    kinds = [e if isinstance(e, str) else e[0] for e in log]
    assert kinds == ["sync", "clock", "call", "sync", "clock"] * 4
    outputs_synced = [e[1] for e in log if not isinstance(e, str)][1::2]
    assert [float(o) for o in outputs_synced] == [1.0, 2.0, 3.0, 4.0]
    assert timer.durations == [5, 1, 2, 3]
    s = timer.stats()
    assert s["n"] == 3 and s["median"] == 2 and s["min"] == 1 and s["max"] == 3
    assert sum(timer.durations) == 11 and sum(timer.measured) == 6


def test_step_timer_without_measured_steps():
    timer = timing.StepTimer(warmup=2)
    timer.run(jax.jit(lambda x: x + 1), jnp.zeros(()))
    assert timer.stats()["n"] == 0 and timer.stats()["median"] is None


def test_measure_interleaved_rows_ratios_and_donated_arguments():
    """The one harness: every variant runs warmup + rounds times in A B A B order; a donated
    argument is fed back through next_args; the baseline's own ratio is exactly 1."""
    order = []
    step = jax.jit(lambda s, x: (s + 1, x * 2), donate_argnums=(0,))
    other = jax.jit(lambda x: jnp.sin(x))
    x = jnp.ones((16,))
    a = timing.Variant("a", timing.aot_compile(step, jnp.zeros(()), x), (jnp.zeros(()), x),
                       next_args=lambda out, args: (out[0], args[1]), info={"batch": 16})
    b = timing.Variant("b", timing.aot_compile(other, x), (x,))
    for v in (a, b):
        compiled = v.compiled.compiled
        v.compiled.compiled = lambda *args, c=compiled, name=v.name: order.append(name) or c(*args)
    rows = timing.measure_interleaved([a, b], rounds=3, warmup=1, baseline="b")
    assert order == ["a", "b"] * 4
    assert [r["variant"] for r in rows] == ["a", "b"] and rows[1]["ratio_to_baseline"] == 1.0
    assert rows[0]["batch"] == 16 and rows[0]["images_per_s"] > 0 and rows[0]["median_ms"] > 0
    assert rows[0]["baseline"] == rows[1]["baseline"] == "b" and rows[0]["compile_s"] >= 0


def _trace_files(profile_dir):
    pattern = os.path.join(profile_dir, "plugins", "profile", "*", "*")
    return sorted(p for p in glob.glob(pattern) if p.endswith((".xplane.pb", ".trace.json.gz")))


def _trace_events(path):
    with gzip.open(path, "rt") as f:
        return json.load(f)["traceEvents"]


def test_profile_window_writes_annotated_trace(tmp_path):
    profile_dir = str(tmp_path / "profile")
    window = timing.ProfileWindow(profile_dir, start_step=2, num_steps=2)
    f = jax.jit(lambda x: jnp.sin(x) * 2)
    x = jnp.ones((64,))
    timer = timing.StepTimer(warmup=0)
    active = []
    with window:
        for i in range(6):
            with window.step(i):
                x = timer.run(f, x)
                active.append(window.active)
    assert active == [False, False, True, True, False, False]
    assert window.done
    files = _trace_files(profile_dir)
    xplane = [p for p in files if p.endswith(".xplane.pb")]
    perfetto = [p for p in files if p.endswith(".trace.json.gz")]
    assert xplane and os.path.getsize(xplane[0]) > 0
    assert perfetto and os.path.getsize(perfetto[0]) > 0
    steps = sorted({int(e["args"]["step_num"]) for e in _trace_events(perfetto[0])
                    if e.get("name") == "train" and "step_num" in e.get("args", {})})
    assert steps == [2, 3]


def test_profile_window_close_inside_window_and_resume_past_start(tmp_path):
    window = timing.ProfileWindow(str(tmp_path), start_step=3, num_steps=5)
    f = jax.jit(lambda x: x + 1)
    x = jnp.zeros(())
    for i in range(10, 12):  # a resumed run: first step already past start_step
        with window.step(i):
            x = timing.sync(f(x))
    assert window.active
    window.close()
    assert window.done and not window.active
    assert any(p.endswith(".xplane.pb") and os.path.getsize(p) > 0 for p in _trace_files(str(tmp_path)))


def test_profile_window_disabled_is_noop(tmp_path):
    window = timing.ProfileWindow(None, start_step=0, num_steps=1)
    with window.step(0):
        pass
    window.close()
    assert not window.done
    assert glob.glob(str(tmp_path / "**"), recursive=True) == [str(tmp_path) + "/"]


def test_profile_window_bad_arguments():
    with pytest.raises(UserError):
        timing.ProfileWindow("x", start_step=0, num_steps=0)
    with pytest.raises(UserError):
        timing.ProfileWindow("x", start_step=-1, num_steps=1)


