"""Default XLA:CPU flags that lightflax's train steps are measured to need.

Imported by ``lightflax/__init__.py`` so every user gets them without knowing.
It only APPENDS to ``XLA_FLAGS`` flags the user did not set, and only for the
jaxlib versions they were measured on (an unknown flag in ``XLA_FLAGS`` aborts
the process, and these flags are experimental). XLA reads ``XLA_FLAGS`` once,
when JAX creates its first backend: importing lightflax after JAX has already
run a computation leaves the running process unchanged.

Set ``LIGHTFLAX_XLA_DEFAULTS=0`` to leave ``XLA_FLAGS`` alone.

Measured (docs/speed.md, "Train-step speed on XLA:CPU"; 2-core CPU dev box): jaxlib 0.10's default
sends every convolution to YNNPACK (``individual_convolution``), which runs the
kernel-gradient convolutions (batch as the contracting dimension, windows as
large as the image) ~3x slower than XLA's Eigen path; YNNPACK's elementwise
fusions (``eltwise``) also cut XLA's own loop fusions apart (25 % more bytes
moved). Keeping YNNPACK for dots and reductions only made the X-ray train steps
~1.5-1.9x (Conv2D) and ~1.15x (LightLayers K=5) faster at 128x128.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

ENV_SWITCH = "LIGHTFLAX_XLA_DEFAULTS"

# Flag -> value; every flag here was measured on jaxlib in TESTED_JAXLIB.
CPU_FLAGS: Dict[str, str] = {
    # jaxlib 0.10.2 default: dot,eltwise,reduce,individual_dot,individual_convolution
    "xla_cpu_experimental_ynn_fusion_type": "dot,reduce,individual_dot",
}
TESTED_JAXLIB: Tuple[Tuple[int, int, int], Tuple[int, int, int]] = ((0, 10, 2), (0, 11, 0))  # [lo, hi)


def _version_tuple(text: str) -> Optional[Tuple[int, int, int]]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece else ""
        if not digits or not piece[0].isdigit():
            return None
        parts.append(int(digits))
    return tuple(parts) if len(parts) == 3 else None  # type: ignore[return-value]


def _jaxlib_version() -> Optional[Tuple[int, int, int]]:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return _version_tuple(version("jaxlib"))
    except PackageNotFoundError:
        return None


def _set_flags(xla_flags: str) -> set:
    names = set()
    for token in xla_flags.split():
        if token.startswith("--"):
            names.add(token[2:].split("=", 1)[0])
    return names


def merged_flags(xla_flags: str, jaxlib_version: Optional[Tuple[int, int, int]],
                 flags: Optional[Dict[str, str]] = None) -> str:
    """``xla_flags`` plus every default flag it does not already name (pure function).

    Returns ``xla_flags`` unchanged when ``jaxlib_version`` is unknown or outside
    :data:`TESTED_JAXLIB`.
    """
    flags = CPU_FLAGS if flags is None else flags
    lo, hi = TESTED_JAXLIB
    if jaxlib_version is None or not lo <= jaxlib_version < hi:
        return xla_flags
    present = _set_flags(xla_flags)
    extra = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    return " ".join(([xla_flags.strip()] if xla_flags.strip() else []) + extra)


def apply(environ=None) -> str:
    """Appends the defaults to ``environ['XLA_FLAGS']`` (default ``os.environ``); returns the result."""
    environ = os.environ if environ is None else environ
    current = environ.get("XLA_FLAGS", "")
    if environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return current
    merged = merged_flags(current, _jaxlib_version())
    if merged != current:
        environ["XLA_FLAGS"] = merged
    return merged
