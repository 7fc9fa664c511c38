"""The large-block reuse layer under malloc (lightflax/native/csrc/alloc/reuse.c, lightflax/reuse_alloc.py).

Its C functions are exercised through ctypes in child processes that preload it, as the entry
points do: contents kept by realloc, zeroed calloc after reuse, alignment, reuse of a freed block,
the memory bound (pages held never above the most live at once), the wait for a live size's free,
threads, the off switch; then a jitted computation gives the same bits with and without the
layer and faults far fewer pages in when warm.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from lightflax import reuse_alloc

LIB = reuse_alloc.library_path()
needs_lib = pytest.mark.skipif(LIB is None or not sys.platform.startswith("linux"),
                               reason="the reuse layer was not built (no C compiler at install)")


@pytest.mark.parametrize(
    "environ, path, expected",
    [
        ({}, "/x/r.so", "/x/r.so"),  # on by default
        ({"LIGHTFLAX_REUSE_ALLOC": "0"}, "/x/r.so", None),
        ({"LIGHTFLAX_REUSE_ALLOC": "1"}, "/x/r.so", "/x/r.so"),
        ({}, None, None),  # not built
        ({"LD_PRELOAD": "/y/other.so"}, "/x/r.so", "/x/r.so /y/other.so"),  # the user's preload kept
        ({"LD_PRELOAD": "/y/other.so /x/r.so"}, "/x/r.so", None),  # after the re-exec: no loop
        ({"LD_PRELOAD": "/y/other.so:/x/r.so"}, "/x/r.so", None),
    ],
)
def test_preload_to_use(environ, path, expected):
    assert reuse_alloc.preload_to_use(environ, path) == expected


def _child(body, *, off=False, timeout=300):
    """Runs PRELUDE + body in a child process with the layer preloaded; its last line's JSON."""
    env = dict(os.environ, LD_PRELOAD=LIB, PYTHONPATH=str(REPO))
    env.pop("GLIBC_TUNABLES", None)
    if off:
        env["LIGHTFLAX_REUSE_ALLOC"] = "0"
    else:
        env.pop("LIGHTFLAX_REUSE_ALLOC", None)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PRELUDE = """
import ctypes as C, json
from lightflax import reuse_alloc
libc = C.CDLL(None)
for name, res, args in [("malloc", C.c_void_p, [C.c_size_t]), ("calloc", C.c_void_p, [C.c_size_t, C.c_size_t]),
                        ("realloc", C.c_void_p, [C.c_void_p, C.c_size_t]), ("free", None, [C.c_void_p]),
                        ("aligned_alloc", C.c_void_p, [C.c_size_t, C.c_size_t]),
                        ("posix_memalign", C.c_int, [C.POINTER(C.c_void_p), C.c_size_t, C.c_size_t]),
                        ("malloc_usable_size", C.c_size_t, [C.c_void_p])]:
    f = getattr(libc, name); f.restype = res; f.argtypes = args
MiB = 1 << 20
def fill(p, n, seed):
    data = bytes((seed + 7 * i) % 251 for i in range(4096)) * (n // 4096) + bytes(n % 4096)
    C.memmove(p, data, n); return data
def same(p, data):
    return C.string_at(p, len(data)) == data
"""


@needs_lib
def test_reuse_contents_alignment_and_realloc():
    out = _child("""
    r = {}
    s0 = reuse_alloc.stats()
    p = libc.malloc(3 * MiB + 5)
    r["page_aligned"] = p % 4096 == 0
    r["usable"] = libc.malloc_usable_size(p) >= 3 * MiB + 5
    fill(p, 3 * MiB + 5, 1); libc.free(p)
    q = libc.malloc(3 * MiB + 17)  # the same page-rounded size: the freed block again
    r["reused_same_block"] = q == p
    libc.free(q)
    z = libc.calloc(1, 3 * MiB + 5)  # a reused block must come back zeroed
    r["calloc_reused"] = z == p
    r["calloc_zero"] = C.string_at(z, 3 * MiB + 5) == bytes(3 * MiB + 5)
    d = fill(z, 3 * MiB + 5, 2)
    g = libc.realloc(z, 9 * MiB)  # grow: ours -> ours
    r["grow_kept"] = same(g, d)
    s = libc.realloc(g, 1000)  # shrink below the threshold: ours -> glibc
    r["shrink_kept"] = same(s, d[:1000])
    small = libc.malloc(5000); d2 = fill(small, 5000, 3)
    big = libc.realloc(small, 2 * MiB)  # glibc -> ours
    r["glibc_to_ours_kept"] = same(big, d2)
    libc.free(s); libc.free(big)
    a = libc.aligned_alloc(64, MiB); r["aligned64"] = a % 64 == 0; libc.free(a)
    out = C.c_void_p()
    r["memalign_rc"] = libc.posix_memalign(C.byref(out), 1 << 16, MiB)  # above a page: glibc's
    r["memalign_64k"] = out.value % (1 << 16) == 0; libc.free(out.value)
    del d, d2
    s1 = reuse_alloc.stats()
    r["hits"] = s1["hits"] - s0["hits"]
    r["live_after"] = s1["live_bytes"] - s0["live_bytes"]  # Python's own large objects aside
    r["active"] = reuse_alloc.active()
    print(json.dumps(r))
    """)
    assert out.pop("active") is True
    assert out.pop("memalign_rc") == 0
    assert out.pop("hits") >= 2
    assert out.pop("live_after") == 0
    assert all(out.values()), out  # every check above held


@needs_lib
def test_memory_stays_under_the_live_peak_and_a_step_pattern_is_reused():
    out = _child("""
    import random
    rng = random.Random(0)
    s_start = reuse_alloc.stats()
    sizes = [MiB, 2 * MiB, 3 * MiB + 4096, 8 * MiB]
    live = {}
    bound_ok = True
    for i in range(600):
        if live and (len(live) > 6 or rng.random() < 0.5):
            p = rng.choice(sorted(live)); data = live.pop(p)
            assert same(p, data[:4096]), "a live block was overwritten"
            libc.free(p)
        else:
            n = rng.choice(sizes); p = libc.malloc(n)
            assert p not in live
            live[p] = fill(p, n, i)[:4096]
        s = reuse_alloc.stats()
        bound_ok &= s["live_bytes"] + s["cached_bytes"] <= s["peak_bytes"]
    for p in list(live):
        libc.free(p)
    del live, data
    s = reuse_alloc.stats()
    h0 = reuse_alloc.stats()["hits"]
    for cycle in range(20):  # a step's pattern: the same sizes, allocated, used, all freed
        ps = [libc.malloc(n) for n in (MiB + 1, 3 * MiB, 6 * MiB, 11 * MiB)]
        for p in ps:
            C.memset(p, cycle, 4096)
        for p in ps:
            libc.free(p)
    cycle_hits = reuse_alloc.stats()["hits"] - h0
    s = reuse_alloc.stats()
    # Above the peak, a size already live: a short wait for its free (none comes), then a second block.
    a = libc.malloc(64 * MiB); b = libc.malloc(64 * MiB)
    C.memset(a, 1, 64 * MiB); C.memset(b, 2, 64 * MiB)
    apart = C.string_at(a, 1) == bytes([1]) and C.string_at(b + 64 * MiB - 1, 1) == bytes([2])
    s2 = reuse_alloc.stats()
    libc.free(a); libc.free(b)
    print(json.dumps({"bound_ok": bound_ok, "cycle_hits": cycle_hits,
                      "waits_more": s2["waits"] - s["waits"], "distinct": a != b and b is not None and apart, "live_end": s["live_bytes"] - s_start["live_bytes"]}))
    """)
    assert out["bound_ok"]
    assert out["cycle_hits"] == 4 * 19  # after the first cycle every block is a freed one again
    assert out["waits_more"] == 1 and out["distinct"]
    assert out["live_end"] == 0


@needs_lib
def test_threads_never_share_a_block():
    out = _child("""
    import random, threading
    errors = []
    s0 = reuse_alloc.stats()
    def work(seed):
        rng = random.Random(seed); mine = []
        for i in range(300):
            if mine and rng.random() < 0.5:
                p, tag = mine.pop(rng.randrange(len(mine)))
                if C.string_at(p, 8) != tag: errors.append("overwritten")
                libc.free(p)
            else:
                p = libc.malloc(rng.choice([MiB, 2 * MiB, 4 * MiB]))
                tag = (seed * 100000 + i).to_bytes(8, "little"); C.memmove(p, tag, 8); mine.append((p, tag))
        for p, tag in mine:
            if C.string_at(p, 8) != tag: errors.append("overwritten")
            libc.free(p)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
    s = reuse_alloc.stats()
    print(json.dumps({"errors": errors, "live": s["live_bytes"] - s0["live_bytes"], "hits": s["hits"]}))
    """)
    assert out["errors"] == [] and out["live"] == 0 and out["hits"] > 0


@needs_lib
def test_switched_off_passes_everything_to_glibc():
    out = _child("""
    p = libc.malloc(4 * MiB); libc.free(p); q = libc.malloc(4 * MiB); libc.free(q)
    s = reuse_alloc.stats()
    print(json.dumps({"active": reuse_alloc.active(), "ours": s["hits"] + s["misses"] + s["live_bytes"],
                      "status": reuse_alloc.status()}))
    """, off=True)
    assert out["active"] is False and out["ours"] == 0
    assert out["status"] == {"allocator": "malloc", "reason": "LIGHTFLAX_REUSE_ALLOC=0"}


# An entry point as launch.py starts: re-executed once with the layer, then a jitted computation
# whose temporaries and output are large; the result's bits and the warm calls' page faults.
ENTRY = """
import sys; sys.path.insert(0, {repo!r})
from lightflax import startup; startup.reexec_if_useful()
import hashlib, json, resource
import jax, jax.numpy as jnp, numpy as np
from lightflax import reuse_alloc
f = jax.jit(lambda x: jnp.tanh((x @ x.T) @ x + 1.0).sum(axis=0) + jnp.sort(x, axis=0))
x = jnp.asarray(np.random.default_rng(0).standard_normal((1536, 1536), dtype=np.float32))
y = f(x).block_until_ready(); y = f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    y = f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({{"sha": hashlib.sha256(np.asarray(y).tobytes()).hexdigest(), "faults": faults,
                  "allocator": reuse_alloc.status()["allocator"]}}))
"""


@needs_lib
def test_entry_point_reuses_blocks_same_bits_fewer_faults():
    code = ENTRY.format(repo=str(REPO))
    runs = {}
    for switch in ("1", "0"):
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
        env.update(LIGHTFLAX_REUSE_ALLOC=switch, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[switch] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["1"]["allocator"] == "reuse" and runs["0"]["allocator"] == "malloc"
    assert runs["1"]["sha"] == runs["0"]["sha"]
    # Without the layer every warm call faults its output and temporaries in again (tens of
    # thousands of pages here); with it, they are the previous call's blocks.
    assert runs["0"]["faults"] > 1000, runs
    assert runs["1"]["faults"] < 0.1 * runs["0"]["faults"], runs
