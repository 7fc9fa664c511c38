"""A fingerprint of the compiled train step, to tell whether a code change changed the program.

    python benchmarks/step_fingerprint.py [--size=64] [--batch=8]

For each study model (LightLayers K=5, Conv2D) it compiles the trainer's own train step
(lightflax.speed.model_variant, synthetic data) and prints the sha256 of XLA's optimized HLO
text with the debug information removed (op metadata, source file and line tables), so that two
checkouts that compile the same program print the same digest even when the Python around it
moved. The native kernels appear as custom calls: a change inside their C++ does not change the
digest (benchmarks/peers/table.py's STEP_FILES rule covers that).
"""

import argparse
import hashlib
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # this checkout's lightflax

_DEBUG_TABLES = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)$")


def program_text(hlo: str) -> str:
    """The HLO text without its module name, op metadata and source tables."""
    out, skip = [], False
    for line in hlo.splitlines():
        if _DEBUG_TABLES.match(line):
            skip = True
            continue
        if not line.strip():
            skip = False
        if skip or line.startswith("HloModule"):
            continue
        out.append(re.sub(r", metadata=\{[^}]*\}", "", line))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    from lightflax import speed

    for model, kwargs in (("xray_light", {"k": 5}), ("xray_conv2d", {})):
        v = speed.model_variant(model, kwargs, batch=a.batch, size=a.size)
        text = program_text(v.compiled.compiled.as_text())
        print(f"{model} {a.size}x{a.size} batch {a.batch}: {hashlib.sha256(text.encode()).hexdigest()[:16]} "
              f"({len(text.splitlines())} lines)", flush=True)


if __name__ == "__main__":
    main()
