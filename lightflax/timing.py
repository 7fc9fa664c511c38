"""Precise timing: compile apart from execution, synchronised clocks, XLA costs, traces.

JAX dispatches work asynchronously: a jitted call returns as soon as the work
is queued, so a clock read straight after it measures dispatch, not compute.
Every clock read here is preceded by ``jax.block_until_ready`` on the arrays
the timed work produces (and, before a step starts, on its inputs), so each
interval covers exactly the device work of that interval.

Pieces:

* :func:`aot_compile` lowers and compiles a jitted function ahead of time,
  timing lowering and XLA compilation apart from execution, and reads XLA's
  cost analysis (FLOPs, bytes accessed) and memory analysis of the executable.
* :class:`StepTimer` times individual steps (warm-up kept apart) and
  :func:`summarize` turns the durations into median / p10 / p90. The trainer
  times every train step with it.
* :func:`measure_interleaved` is the harness of speed studies and benchmarks:
  a group of compiled variants run in interleaved rounds (A B C A B C ...),
  each call through a StepTimer, ratios to a baseline per round.
* :class:`ProfileWindow` writes a JAX profiler trace (``*.xplane.pb`` and
  ``*.trace.json.gz``, readable by TensorBoard's profile plugin / XProf and
  Perfetto) of a window of steps, each wrapped in a ``StepTraceAnnotation``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from lightflax.errors import UserError

# Fields of jax's CompiledMemoryStats, renamed to what they mean.
_MEMORY_FIELDS = {
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
    "temp_bytes": "temp_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
    "peak_bytes": "peak_memory_in_bytes",
}


def sync(tree: Any) -> Any:
    """Blocks until every array in ``tree`` is computed; returns ``tree``.

    Non-array leaves (Python numbers, None) are ignored.
    """
    return jax.block_until_ready(tree)


@dataclasses.dataclass
class CompiledStep:
    """An ahead-of-time compiled function and what compiling it cost.

    Attributes:
      compiled: the ``jax.stages.Compiled`` executable; call it like the
        jitted function (same argument shapes, dtypes and shardings).
      lower_s: seconds spent tracing and lowering to StableHLO.
      compile_s: seconds spent in XLA compilation.
      flops: floating-point operations of one call from XLA's cost analysis
        (for a partitioned program: of the program one device runs), or None
        where the backend gives none.
      bytes_accessed: bytes read and written by one call (same source), or None.
      memory: executable memory from ``compiled.memory_analysis()`` in bytes,
        keys ``argument_bytes, output_bytes, alias_bytes, temp_bytes,
        generated_code_bytes, peak_bytes`` (those the backend reports), or None.
      cost: the raw cost-analysis dict (empty when unavailable).
    """

    compiled: Any
    lower_s: float
    compile_s: float
    flops: Optional[float]
    bytes_accessed: Optional[float]
    memory: Optional[Dict[str, int]]
    cost: Dict[str, float]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)


def cost_analysis(compiled: Any) -> Dict[str, float]:
    """XLA's cost analysis of a compiled executable as one flat dict.

    jax 0.4.x returned a list with one dict per program, newer versions
    (0.10.2 here) a dict; some backends return None or raise. Lists are merged
    by summing values (one entry per partition/program). Returns {} when the
    backend gives nothing.
    """
    try:
        raw = compiled.cost_analysis()
    except Exception:  # backends without cost analysis raise (XlaRuntimeError, NotImplementedError)
        return {}
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return {str(k): float(v) for k, v in raw.items()}
    merged: Dict[str, float] = {}
    for entry in raw:
        for k, v in (entry or {}).items():
            merged[str(k)] = merged.get(str(k), 0.0) + float(v)
    return merged


def memory_analysis(compiled: Any) -> Optional[Dict[str, int]]:
    """The executable's memory use in bytes, or None where the backend gives none."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not implemented on some backends
        return None
    if stats is None:
        return None
    out = {name: int(getattr(stats, field)) for name, field in _MEMORY_FIELDS.items() if hasattr(stats, field)}
    return out or None


def _nonneg(cost: Mapping[str, float], key: str) -> Optional[float]:
    # XLA reports -1 (or omits the key) when it does not know.
    value = cost.get(key)
    return value if value is not None and value >= 0 else None


def aot_compile(jitted_fn: Any, *args: Any, compiler_options: Optional[Dict[str, Any]] = None,
                **kwargs: Any) -> CompiledStep:
    """Lowers and compiles ``jitted_fn`` for ``args`` ahead of time, timing each phase.

    Args:
      jitted_fn: a ``jax.jit``-wrapped function (anything with ``.lower``).
      *args, **kwargs: example arguments (arrays or ``jax.ShapeDtypeStruct``
        with the shardings the real call will use). Nothing is executed and
        donated buffers are not consumed.
      compiler_options: XLA options for this compilation only (e.g.
        ``{"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}``;
        enum-valued options take the enum names here, not XLA_FLAGS' short names), so that variants
        of one function under different options can be measured in one process.

    Returns:
      A :class:`CompiledStep`. Calling its ``compiled`` with arguments of other
      shapes raises instead of silently recompiling.

    The times are what this call cost: lowering or compiling the same function
    for the same argument types a second time in one process hits jax's
    in-memory caches (and an enabled persistent compilation cache hits disk),
    and then reports milliseconds. Measure compile time on first use.
    """
    if not hasattr(jitted_fn, "lower"):
        raise TypeError(f"aot_compile needs a jax.jit-wrapped function, got {type(jitted_fn).__name__}")
    t0 = time.perf_counter()
    lowered = jitted_fn.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options) if compiler_options else lowered.compile()
    t2 = time.perf_counter()
    cost = cost_analysis(compiled)
    return CompiledStep(
        compiled=compiled,
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        flops=_nonneg(cost, "flops"),
        bytes_accessed=_nonneg(cost, "bytes accessed"),
        memory=memory_analysis(compiled),
        cost=cost,
    )


def summarize(seconds: Sequence[float]) -> Dict[str, Any]:
    """Summary statistics of durations in seconds.

    Returns a dict with ``n, median, p10, p90, mean, std, min, max`` (seconds;
    percentiles by linear interpolation, std with ddof=0). With no durations
    ``n`` is 0 and every statistic is None.
    """
    x = np.asarray(list(seconds), dtype=np.float64)
    if x.size == 0:
        return {"n": 0, "median": None, "p10": None, "p90": None, "mean": None, "std": None,
                "min": None, "max": None}
    p10, median, p90 = np.percentile(x, [10, 50, 90])
    return {
        "n": int(x.size),
        "median": float(median),
        "p10": float(p10),
        "p90": float(p90),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
    }


class StepTimer:
    """Times steps one by one, synchronising before every clock read.

    The first ``warmup`` recorded steps are kept apart from the statistics
    (they include one-off costs: first-touch allocation, autotuning, and for a
    function that was not compiled ahead of time, compilation).

    Example::

      timer = StepTimer(warmup=1)
      for batch in batches:
          state, metrics = timer.run(compiled, state, batch)
      timer.stats()["median"]

    Note that synchronising every step removes the overlap of Python dispatch
    with device work that an unsynchronised loop has; for tiny steps that can
    cost tens of microseconds per step.
    """

    def __init__(self, warmup: int = 1, clock: Callable[[], float] = time.perf_counter):
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.clock = clock  # seconds; injectable so that a test can drive it without patching `time`
        self.durations: List[float] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Calls ``fn(*args, **kwargs)`` and records its duration; returns its outputs.

        The inputs are synchronised before the first clock read (so earlier
        queued work is not billed to this step) and the outputs before the
        second.
        """
        sync((args, kwargs))
        t0 = self.clock()
        out = fn(*args, **kwargs)
        sync(out)
        self.durations.append(self.clock() - t0)
        return out

    @property
    def measured(self) -> List[float]:
        """Durations of the steps after warm-up, in seconds."""
        return self.durations[self.warmup:]

    def stats(self) -> Dict[str, Any]:
        """:func:`summarize` of the steps after warm-up."""
        return summarize(self.measured)

class ProfileWindow:
    """Captures a JAX profiler trace of steps ``start_step .. start_step + num_steps - 1``.

    Every step run under :meth:`step` is wrapped in
    ``jax.profiler.StepTraceAnnotation("train", step_num=...)`` so profilers
    group events by step. The trace starts at the first step numbered
    ``>= start_step`` (so a resumed run past ``start_step`` still gets a
    window) and stops after ``num_steps`` steps, or on :meth:`close`. With
    ``profile_dir=None`` everything is a no-op.

    The trace lands in ``profile_dir/plugins/profile/<timestamp>/`` as
    ``<host>.xplane.pb`` (TensorBoard with the profile plugin, XProf) and
    ``<host>.trace.json.gz`` (Perfetto / chrome://tracing). jax writes both
    itself; no extra package is needed to write them, only to view them.

    The caller must synchronise each step's outputs inside the ``with`` block
    (``StepTimer.run`` does) so the device work lies inside the window.
    """

    def __init__(self, profile_dir: Optional[str], start_step: int = 3, num_steps: int = 3):
        if num_steps < 1:
            raise UserError(f"the number of profiled steps must be >= 1, got {num_steps}")
        if start_step < 0:
            raise UserError(f"the first profiled step must be >= 0, got {start_step}")
        self.profile_dir = profile_dir
        self.start_step = start_step
        self.num_steps = num_steps
        self._active = False
        self._done = False
        self._traced = 0

    @property
    def active(self) -> bool:
        """Whether a trace is being recorded now."""
        return self._active

    @property
    def done(self) -> bool:
        """Whether the window has been recorded (and written)."""
        return self._done

    def _start(self) -> None:
        try:
            os.makedirs(self.profile_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"--profile_dir {self.profile_dir} cannot be created ({e.strerror}); "
                            f"choose a writable directory") from None
        jax.profiler.start_trace(self.profile_dir)
        self._active = True

    def _stop(self) -> None:
        self._active = False
        self._done = True
        jax.profiler.stop_trace()

    @contextlib.contextmanager
    def step(self, step_num: int) -> Iterator[None]:
        """Context for one step: starts/stops the trace at the window's edges, annotates the step."""
        if self.profile_dir is None:
            yield
            return
        if not self._active and not self._done and step_num >= self.start_step:
            self._start()
        with jax.profiler.StepTraceAnnotation("train", step_num=step_num):
            yield
        if self._active:
            self._traced += 1
            if self._traced >= self.num_steps:
                self._stop()

    def close(self) -> None:
        """Stops and writes a trace still being recorded (e.g. the run ended inside the window)."""
        if self._active:
            self._stop()

    def __enter__(self) -> "ProfileWindow":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclasses.dataclass
class Variant:
    """One contender of :func:`measure_interleaved`: a compiled function and its arguments.

    ``next_args(outputs, args) -> args`` feeds a step that donates its inputs (a
    train step's state: ``lambda out, a: (out[0],) + a[1:]``); ``info`` is copied
    into the variant's row.
    """

    name: str
    compiled: CompiledStep
    args: Tuple[Any, ...]
    next_args: Optional[Callable[[Any, Tuple[Any, ...]], Sequence[Any]]] = None
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)


def measure_interleaved(variants: Sequence[Variant], *, rounds: int = 7, warmup: int = 1,
                        baseline: Optional[str] = None) -> List[Dict[str, Any]]:
    """Times ``variants`` in interleaved rounds (A B C ... A B C ...); one row per variant.

    Each call runs through a :class:`StepTimer` (inputs and outputs synchronised
    around the clock reads), after ``warmup`` calls per variant. Rows hold the
    median/p10/p90 in ms, the ratio to the ``baseline`` variant (default the first)
    as the median of the per-round ratios (machine noise hits every variant of a
    round alike), and the XLA costs of the compiled function.
    """
    variants = list(variants)
    args = [tuple(v.args) for v in variants]
    timers = [StepTimer(warmup=warmup) for _ in variants]
    for _ in range(warmup + rounds):
        for i, v in enumerate(variants):
            out = timers[i].run(v.compiled.compiled, *args[i])
            if v.next_args:
                args[i] = tuple(v.next_args(out, args[i]))
    base_i = next((i for i, v in enumerate(variants) if v.name == baseline), 0)
    base = np.array(timers[base_i].measured)
    return [_row(v, np.array(t.measured), base, variants[base_i].name) for v, t in zip(variants, timers)]


def _row(v: Variant, t: np.ndarray, base: np.ndarray, baseline: str) -> Dict[str, Any]:
    c, median = v.compiled, float(np.median(t))
    batch = v.info.get("batch")
    return {
        **v.info,
        "variant": v.name,
        "median_ms": 1e3 * median,
        "p10_ms": 1e3 * float(np.percentile(t, 10)),
        "p90_ms": 1e3 * float(np.percentile(t, 90)),
        "ratio_to_baseline": float(np.median(t / base)),
        "baseline": baseline,
        "images_per_s": batch / median if batch else None,
        "compile_s": c.compile_s,
        "gflops": c.flops / 1e9 if c.flops is not None else None,
        "gbytes": c.bytes_accessed / 1e9 if c.bytes_accessed is not None else None,
        "achieved_gflops_per_s": c.flops / median / 1e9 if c.flops else None,
        "arithmetic_intensity": (c.flops / c.bytes_accessed) if (c.flops and c.bytes_accessed) else None,
        "peak_mb": (c.memory or {}).get("peak_bytes", 0) / 1e6 if c.memory else None,
    }
