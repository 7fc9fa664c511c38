"""Page faults and kernel time per train step, with and without huge pages (lightflax/huge_pages.py).

    python benchmarks/bench_page_faults.py xray_light 224      # as the process was started
    for t in "" glibc.malloc.hugetlb=1 "" glibc.malloc.hugetlb=1; do
        GLIBC_TUNABLES=$t python benchmarks/bench_page_faults.py xray_light 224; done

Does NOT re-execute itself (it measures the process as started). Per step, after two warm-up
steps, over five steps: median wall ms, user and system CPU ms, minor page faults, and the
process's peak RSS (getrusage).
"""

import os
import resource
import sys
import time

import numpy as np

from lightflax import speed, timing


def main(model="xray_light", size="224", batch="64", steps="5"):
    size, batch, steps = int(size), int(batch), int(steps)
    v = speed.model_variant(model, {"k": 5} if model == "xray_light" else {}, batch=batch, size=size)
    args = v.args
    for _ in range(2):
        args = v.next_args(timing.sync(v.compiled.compiled(*args)), args)
    walls, r0 = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t = time.perf_counter()
        out = timing.sync(v.compiled.compiled(*args))
        walls.append(time.perf_counter() - t)
        args = v.next_args(out, args)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} {model} {size}² b{batch}: "
          f"wall {1e3 * np.median(walls):.0f} ms, user {(r1.ru_utime - r0.ru_utime) / steps * 1e3:.0f} ms, "
          f"sys {(r1.ru_stime - r0.ru_stime) / steps * 1e3:.0f} ms, "
          f"minor faults {(r1.ru_minflt - r0.ru_minflt) / steps:.0f} per step, peak RSS {r1.ru_maxrss / 1024:.0f} MiB",
          flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
