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
* The measurement protocol of every speed comparison (:func:`round_ratios`,
  :func:`pool`, :func:`verdict`, :func:`machine_state`): N independent runs of
  interleaved rounds, the ratio per round, all rounds of all runs pooled into the
  median and the 10-90 % range; "faster" only when the whole range is below 1.0,
  "slower" when it is above, else "at par"; each run records the machine's state.
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
    round alike) with its 10-90 % range and :func:`verdict`, and the XLA
    costs of the compiled function.
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


def _ratio_fields(t: np.ndarray, base: np.ndarray) -> Dict[str, Any]:
    # the measurement protocol (below): per-round ratios, median and 10-90 % range, verdict
    pooled = pool([round_ratios(t, base)])
    return {"ratio_to_baseline": pooled["median"], "ratio_p10": pooled["p10"], "ratio_p90": pooled["p90"],
            "verdict": verdict(pooled["p10"], pooled["p90"])}


def _row(v: Variant, t: np.ndarray, base: np.ndarray, baseline: str) -> Dict[str, Any]:
    c, median = v.compiled, float(np.median(t))
    batch = v.info.get("batch")
    return {
        **v.info,
        "variant": v.name,
        "median_ms": 1e3 * median,
        "p10_ms": 1e3 * float(np.percentile(t, 10)),
        "p90_ms": 1e3 * float(np.percentile(t, 90)),
        **_ratio_fields(t, base),
        "baseline": baseline,
        "images_per_s": batch / median if batch else None,
        "compile_s": c.compile_s,
        "gflops": c.flops / 1e9 if c.flops is not None else None,
        "gbytes": c.bytes_accessed / 1e9 if c.bytes_accessed is not None else None,
        "achieved_gflops_per_s": c.flops / median / 1e9 if c.flops else None,
        "arithmetic_intensity": (c.flops / c.bytes_accessed) if (c.flops and c.bytes_accessed) else None,
        "peak_mb": (c.memory or {}).get("peak_bytes", 0) / 1e6 if c.memory else None,
    }


# --- The measurement protocol of speed comparisons ---
# A comparison of A against B is made of N independent runs (fresh processes each);
# inside a run A and B take turns in interleaved rounds (A B A B ...), so that a
# change in the machine's load hits both alike. The ratio A/B is computed per
# round; the rounds of all runs are pooled and reported as the median with the
# 10-90 % range. Only a range that lies wholly below 1.0 reads "faster", wholly
# above "slower"; a range that straddles 1.0 is "at par".
#
# Every run also records the state of the machine it ran on (:func:`machine_state`,
# before and after): load average, CPU model and count, the fraction of CPU time
# stolen by a hypervisor and the busy fraction over a short interval, the kernels
# lightflax uses and the thread settings in the environment.
#
# The statistics are pure functions of their inputs (tests give exact values);
# only :func:`machine_state` and :func:`read_cpu_times` read the machine.

# Fields of the "cpu" line of /proc/stat, in order (guest times are already counted in user/nice).
_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
# Environment variables that set thread counts or kernels, recorded with every run.
THREAD_ENV_PREFIXES = ("OMP_", "MKL_", "TF_NUM_", "LIGHTFLAX_")
THREAD_ENV_NAMES = ("XLA_FLAGS",)


def round_ratios(a: Sequence[float], b: Sequence[float]) -> list:
    """Per-round ratios ``a[i] / b[i]`` of two contenders timed in the same interleaved rounds.

    Raises ValueError when the lengths differ, a list is empty, or a time is not positive.
    """
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_.shape != b_.shape or a_.ndim != 1 or a_.size == 0:
        raise ValueError(f"round_ratios needs two equal-length non-empty lists of times, got {len(a)} and {len(b)}")
    if (a_ <= 0).any() or (b_ <= 0).any():
        raise ValueError("round_ratios: every time must be > 0")
    return [float(x) for x in a_ / b_]


def pool(runs: Sequence[Sequence[float]]) -> Dict[str, Any]:
    """Pools the per-round values of several runs: ``n_runs, n_rounds, median, p10, p90``.

    Percentiles are linear interpolations (numpy's default) over all rounds of all
    runs together. Raises ValueError when there is no round at all.
    """
    values = np.asarray([float(x) for run in runs for x in run], dtype=np.float64)
    if values.size == 0:
        raise ValueError("pool: no rounds to pool")
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {"n_runs": len(runs), "n_rounds": int(values.size), "median": float(median), "p10": float(p10),
            "p90": float(p90)}


def verdict(p10: float, p90: float) -> str:
    """"faster" when the 90th percentile ratio is below 1.0, "slower" when the 10th is above
    1.0, else "at par" (the range straddles or touches 1.0)."""
    if p90 < 1.0:
        return "faster"
    if p10 > 1.0:
        return "slower"
    return "at par"


def round_value(step_seconds: Sequence[float]) -> float:
    """One round's figure for one contender: the median of its step times in that round."""
    if len(step_seconds) == 0:
        raise ValueError("round_value: a round with no steps")
    return float(np.median(np.asarray(step_seconds, dtype=np.float64)))


def parse_cpu_times(stat_text: str) -> Dict[str, int]:
    """The aggregate ``cpu`` line of a /proc/stat text as ``{field: jiffies}`` (missing fields 0)."""
    for line in stat_text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:1 + len(_STAT_FIELDS)]]
            values += [0] * (len(_STAT_FIELDS) - len(values))
            return dict(zip(_STAT_FIELDS, values))
    raise ValueError("no aggregate 'cpu' line in the /proc/stat text")


def read_cpu_times(path: str = "/proc/stat") -> Optional[Dict[str, int]]:
    """A snapshot of the machine's CPU times (:func:`parse_cpu_times`), or None where unreadable."""
    try:
        with open(path) as f:
            return parse_cpu_times(f.read())
    except (OSError, ValueError):
        return None


def cpu_fractions(before: Mapping[str, int], after: Mapping[str, int]) -> Dict[str, Optional[float]]:
    """Between two snapshots: the fraction of all CPU time that was stolen (``steal``) and that was
    busy (neither idle nor iowait). None for both when no time passed."""
    delta = {k: after[k] - before[k] for k in _STAT_FIELDS}
    total = sum(delta.values())
    if total <= 0:
        return {"steal": None, "busy": None}
    return {"steal": delta["steal"] / total, "busy": (total - delta["idle"] - delta["iowait"]) / total}


def cpu_model(cpuinfo_text: str) -> Optional[str]:
    """The first ``model name`` of a /proc/cpuinfo text, or None."""
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return None


def thread_env(environ: Mapping[str, str]) -> Dict[str, str]:
    """The thread and kernel settings of an environment (OMP_*, MKL_*, TF_NUM_*, LIGHTFLAX_*, XLA_FLAGS)."""
    return {k: environ[k] for k in sorted(environ)
            if k.startswith(THREAD_ENV_PREFIXES) or k in THREAD_ENV_NAMES}


def machine_state(interval_s: float = 1.0, kernels: bool = True) -> Dict[str, Any]:
    """The machine's state now: load average (1/5/15 min), CPU model and count, the steal and busy
    fractions of CPU time over the next ``interval_s`` seconds, lightflax's kernels
    (``lightflax.native.status()``, when ``kernels``; it imports jax) and the thread environment."""
    before = read_cpu_times()
    time.sleep(interval_s)
    after = read_cpu_times()
    try:
        with open("/proc/cpuinfo") as f:
            model = cpu_model(f.read())
    except OSError:
        model = None
    state: Dict[str, Any] = {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg": list(os.getloadavg()),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "interval_s": interval_s,
        **({"steal": None, "busy": None} if before is None or after is None else cpu_fractions(before, after)),
        "thread_env": thread_env(os.environ),
    }
    if kernels:
        from lightflax import native  # imports jax: only where asked

        state["kernels"] = native.status()
    return state
