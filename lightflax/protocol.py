"""The measurement protocol of every speed comparison: per-round ratios, pooled runs, a verdict.

A comparison of A against B is made of N independent runs (fresh processes each);
inside a run A and B take turns in interleaved rounds (A B A B ...), so that a
change in the machine's load hits both alike. The ratio A/B is computed per
round; the rounds of all runs are pooled and reported as the median with the
10-90 % range. Only a range that lies wholly below 1.0 reads "faster", wholly
above "slower"; a range that straddles 1.0 is "at par".

Every run also records the state of the machine it ran on (:func:`machine_state`,
before and after): load average, CPU model and count, the fraction of CPU time
stolen by a hypervisor and the busy fraction over a short interval, the kernels
lightflax uses and the thread settings in the environment.

The statistics are pure functions of their inputs (tests give exact values);
only :func:`machine_state` and :func:`read_cpu_times` read the machine.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

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
