"""Whole train steps, native vs XLA, for the native library named by $LIGHTFLAX_NATIVE_LIB (or the built one).

    STEPS=20 python benchmarks/step_compare_builds.py

Runs tests/test_native.py's whole-step comparison (STEP_CODE: SGD from one initial state; loss and moving
statistics of step 1, the step-1 gradients, the parameters after STEPS steps against XLA and against XLA's
own optimised-vs-unoptimised discrepancy) for MODELS (xray_conv2d,xray_light:5) and prints its report lines.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_native as t  # noqa: E402

STEPS = int(os.environ.get("STEPS", "20"))
cases = {}
for spec in os.environ.get("MODELS", "xray_conv2d,xray_light:5").split(","):
    name, _, k = spec.partition(":")
    cases[f"{name}{'-k' + k if k else ''}-{STEPS}steps"] = t._case(name, {"k": int(k)} if k else {}, STEPS)
for name, text in t._run_steps(cases).items():
    print("===", name)
    print(text)
