"""Single-threaded per-operation CPU profile of one training step: lightflax vs tf.keras (docs/profile.md).

    python benchmarks/profile_ops.py --peers_python=.venv-peers/bin/python --size=160 --batch=32 --repeats=3

Both frameworks build the study's models through the peer workers (benchmarks/peers/*_worker.py,
parameter counts checked as run_peers.py does) and run in separate processes, pinned to one core
(``taskset -c CORE``), one thread each: lightflax with its default native kernels at one native
thread and XLA without its multi-threaded Eigen; tf.keras with intra/inter-op parallelism 1.
Each worker runs warm-up steps, then --steps timed steps (process CPU time, no profiler), then
--steps steps under the framework's profiler (jax.profiler / tf.profiler). Per-operation times
come from the trace (XLA's thunks, the native handlers among them; TF's kernels); on a shared
machine they are wall times, so each is scaled by the profiled window's CPU/wall ratio (the share
of time the process had the core, assumed uniform over the window) into CPU ms; what the ops
do not cover (Python, dispatch, executor) is the window's CPU minus the ops' sum. lightflax's
conv backward handler computes backward-data and backward-weights in one call: it is split by
oneDNN's own verbose times of one extra step. Raw results: benchmarks/results/profile/.
"""

import argparse
import datetime
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers")
CATS = ["conv forward (+bias+ReLU)", "conv backward-data", "conv backward-weights (+bias)",
        "conv backward, rest of the native handler (ReLU mask, bias grad, reorders)", "BatchNorm fwd",
        "BatchNorm bwd", "ReLU fwd/bwd (not fused)", "max pool fwd", "max pool bwd", "dense (+global avg pool)",
        "loss (+L2)", "optimizer update", "copies/layout", "other ops", "outside ops (runtime, Python)"]
FWD, BWD_DATA, BWD_W, BWD_REST, BN_F, BN_B, RELU, POOL_F, POOL_B, DENSE, LOSS, OPT, COPY, OTHER, OUTSIDE = CATS


# ---------------------------------------------------------------------------- categories

NATIVE_CATS = {"lightflax_conv_fwd": FWD, "lightflax_conv_bwd_w": BWD_W, "lightflax_bn_train": BN_F,
               "lightflax_bn_apply": BN_F, "lightflax_bn_reduce": BN_F, "lightflax_bn_bwd": BN_B,
               "lightflax_bn_bwd_reduce": BN_B, "lightflax_bn_bwd_apply": BN_B, "lightflax_pool_fwd": POOL_F,
               "lightflax_pool_bwd": POOL_B}


def xla_category(opcode, target, op_name, name):
    """The category of one XLA thunk from its HLO instruction (opcode, custom-call target, op_name)."""
    if target:
        return NATIVE_CATS.get(target, "conv_bwd" if target == "lightflax_conv_bwd" else OTHER)
    if opcode in ("copy", "transpose", "copy-start", "copy-done") or "copy" in name or "transpose_fusion" in name:
        return COPY
    if "jvp(" not in op_name:  # outside the differentiated function: the update, the batch gather, RNG
        return OTHER if re.search(r"gather|_take|random|threefry|iota|psum|all-reduce", op_name + name) else OPT
    back = "transpose(jvp(" in op_name
    mod = op_name.split("jvp(", 1)[1]
    if re.search(r"head|classify|dense|Dense", mod):
        return DENSE
    if re.search(r"(^|/)[^/]*(bn|BatchNorm)[^/]*/", mod):
        return BN_B if back else BN_F
    if re.search(r"relu|/max$|select_n|/gt$", mod) and "pool" not in mod:
        return RELU
    if "pool" in mod or "reduce_window" in mod:
        return POOL_B if back else POOL_F
    if re.search(r"(^|/)[^/]*conv[^/]*/", mod):
        return BWD_W if back else FWD
    if re.search(r"loss|softmax|log|cross|l2|regular|square", mod) or "PlainNet" not in mod:
        return LOSS
    return OTHER


TF_TYPES = [(r"BackpropInput", BWD_DATA), (r"BackpropFilter|BiasAddGrad", BWD_W),
            (r"Conv2D|BiasAdd", FWD), (r"FusedBatchNormGrad", BN_B), (r"FusedBatchNorm", BN_F),
            (r"Relu", RELU), (r"MaxPoolGrad", POOL_B), (r"MaxPool", POOL_F),
            (r"Adam|ApplyAdam", OPT), (r"SparseSoftmaxCrossEntropy", LOSS),
            (r"Transpose|ToTf|InputConversion|Reorder|Copy|Identity|Reshape", COPY)]


def tf_category(name, op_type):
    """The category of one TF kernel from its node name and op type."""
    if re.search(r"(^|/)Adam(/|$)|AssignAddVariableOp|ResourceApply", name + "/" + op_type) and "gradient" not in name:
        return OPT
    if re.search(r"gradient_tape/.*light_conv2d[^/]*/add", name):  # LightConv2D's bias gradients
        return BWD_W
    if re.search(r"dense|global_average_pooling", name) and not re.search(r"Transpose", op_type):
        return DENSE
    if re.search(r"regularizer|sparse_categorical_crossentropy|loss", name):
        return LOSS
    for pat, cat in TF_TYPES:
        if re.search(pat, op_type):
            if cat == FWD and "gradient_tape" in name:
                return BWD_W
            return cat
    return OTHER


def exclusive_durations(events):
    """(name, exclusive µs) of trace events on one thread: a parent's time without its children's."""
    events = sorted(events, key=lambda e: (e[0], -e[1]))
    out, stack = [], []  # stack of [end, index]
    for ts, dur, key in events:
        while stack and ts >= stack[-1][0] - 1e-3:
            stack.pop()
        if stack:
            out[stack[-1][1]][1] -= dur
        out.append([key, dur])
        stack.append([ts + dur, len(out) - 1])
    return out


# ---------------------------------------------------------------------------- workers


def capture_build(module, argv):
    """The peer worker's own build() (its model, optimizer, data, step) without its line protocol."""
    sys.path.insert(0, PEERS)
    sys.argv = [module + ".py"] + argv
    mod = __import__(module)
    got = []
    mod.serve = got.append
    mod.main()
    return got[0]


def timed(step, n):
    cpu, wall = [], []
    for _ in range(n):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return cpu, wall


def window(step, n, start, stop):
    """Run n steps between start() and stop(); CPU and wall seconds of the whole window."""
    start()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        step()
    c, w = time.process_time() - c0, time.perf_counter() - w0
    stop()
    return c, w


def hlo_index(text):
    """HLO instruction name -> (opcode, custom-call target, op_name) of the compiled module."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", text, re.M):
        name, rest = m.groups()
        op = re.match(r"(?:\([^=]*?\)|\S+) ([\w\-]+)\(", rest)
        tgt = re.search(r'custom_call_target="(\w+)"', rest)
        opn = re.search(r'op_name="([^"]*)"', rest)
        out[name] = (op.group(1) if op else "?", tgt.group(1) if tgt else "", opn.group(1) if opn else "")
    return out


def onednn_breakdown(step, n=2):
    """oneDNN's verbose times (ms per primitive kind/propagation) and the native handlers' wall ms
    (lightflax.native.call_times) over n extra steps: what each handler spends in oneDNN."""
    import ctypes

    from lightflax import native
    from lightflax.native import _loader

    lib, libc = ctypes.CDLL(_loader.onednn_path() or _loader.ONEDNN_SONAME), ctypes.CDLL(None)
    ms, impl, t0 = {}, {}, native.call_times()
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(1)
        sys.stdout.flush()
        os.dup2(f.fileno(), 1)
        try:
            lib.dnnl_set_verbose(2)
            for _ in range(n):
                step()
            lib.dnnl_set_verbose(0)
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        for line in f:
            p = line.strip().split(",")
            if len(p) > 2 and p[1] == "primitive":  # oneDNN 3.x: onednn_verbose,primitive,exec,cpu,...
                p = p[:1] + p[2:]
            if len(p) > 6 and p[1] == "exec":
                for key, into in ((f"{p[3]}/{p[5]}", ms), (f"{p[3]}/{p[5]}/{p[4]}/{p[-2]}", impl)):
                    into[key] = into.get(key, 0.0) + float(p[-1]) / n
    t1 = native.call_times()
    return {"primitive_ms": ms, "handler_ms": {k: (t1[k] - t0[k]) * 1e3 / n for k in t1},
            "impl_ms": dict(sorted(impl.items(), key=lambda kv: -kv[1]))}


def split_conv_bwd(key, ms, onednn):
    """A conv_bwd handler call's ms split as oneDNN's verbose times split that handler's time."""
    prim, hand = onednn["primitive_ms"], onednn["handler_ms"]["conv_bwd"]
    d, w = prim.get("convolution/backward_data", 0.0), prim.get("convolution/backward_weights", 0.0)
    rest = max(hand - d - w, 0.0)
    tot = d + w + rest
    return [(BWD_DATA, key + " (backward_data share)", ms * d / tot),
            (BWD_W, key + " (backward_weights share)", ms * w / tot),
            (BWD_REST, key + " (rest of handler)", ms * rest / tot)]


def lightflax_worker(a):
    import inspect

    import jax

    from lightflax import native

    build = capture_build("lightflax_worker", [f"--model={a.model}", f"--k={a.k}", f"--size={a.size}",
                                               f"--batch={a.batch}", "--threads=1"])
    step, info = build()
    variant = inspect.getclosurevars(step).nonlocals["v"]  # the worker's compiled step
    index = hlo_index(variant.compiled.compiled.as_text())
    for _ in range(a.warmup + 1):
        step()
    cpu, wall = timed(step, a.steps)
    logdir = tempfile.mkdtemp(prefix="lf_prof_")
    native.reset_call_counts()
    win_cpu, win_wall = window(step, a.steps, lambda: jax.profiler.start_trace(logdir), jax.profiler.stop_trace)
    handler_s = native.call_times()
    onednn = onednn_breakdown(step)
    ev = json.load(gzip.open(glob.glob(os.path.join(logdir, "plugins/profile/*/*.trace.json.gz"))[0]))
    by_thread = {}
    for e in ev["traceEvents"]:
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
            by_thread.setdefault(e["tid"], []).append((e["ts"], e["dur"], e["args"]["hlo_op"]))
    ops = {}
    for evs in by_thread.values():
        for key, us in exclusive_durations(evs):
            ops[key] = ops.get(key, 0.0) + us * 1e-3
    cats = {}
    for key, ms in ops.items():
        cat = xla_category(*index.get(key, ("?", "", "")), key)
        parts = split_conv_bwd(key, ms, onednn) if cat == "conv_bwd" else [(cat, key, ms)]
        for cat, k, part in parts:
            cats.setdefault(cat, []).append((k + " " + index.get(key, ("", "", ""))[1], part))
    info.update(jax=jax.__version__, native=native.status(), native_handler_s=handler_s, onednn=onednn)
    return info, cpu, wall, win_cpu, win_wall, cats


def keras_worker(a):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    build = capture_build("keras_worker", [f"--model={a.model}", f"--k={a.k}", f"--size={a.size}",
                                           f"--batch={a.batch}"])
    step, info = build()
    for _ in range(a.warmup + 1):
        step()
    cpu, wall = timed(step, a.steps)
    logdir = tempfile.mkdtemp(prefix="tf_prof_")
    win_cpu, win_wall = window(step, a.steps, lambda: tf.profiler.experimental.start(logdir),
                               tf.profiler.experimental.stop)
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(open(glob.glob(os.path.join(logdir, "**/*.xplane.pb"), recursive=True)[0], "rb").read())
    cats = {}
    for plane in space.planes:
        for line in plane.lines:
            evs = []
            for e in line.events:
                name = plane.event_metadata[e.metadata_id].name
                if re.fullmatch(r"[\w/.\-]+:_?\w+", name):  # a TF kernel: "node/name:OpType"
                    evs.append((e.offset_ps * 1e-6, e.duration_ps * 1e-6, name))
            for key, us in exclusive_durations(evs):
                node, op_type = key.rsplit(":", 1)
                cats.setdefault(tf_category(node, op_type), []).append((key, us * 1e-3))
    info.update(tf=tf.__version__, onednn_opts=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"))
    return info, cpu, wall, win_cpu, win_wall, cats


def worker(a):
    info, cpu, wall, win_cpu, win_wall, cats = (lightflax_worker if a.worker == "lightflax" else keras_worker)(a)
    share = win_cpu / win_wall  # the profiled window's CPU per wall second: ops' wall -> CPU
    rows = {c: sum(ms for _, ms in v) * share / a.steps for c, v in cats.items()}
    rows[OUTSIDE] = win_cpu * 1e3 / a.steps - sum(rows.values())
    top = {c: sorted(((k, round(ms * share / a.steps, 3)) for k, ms in _merge(v).items()), key=lambda kv: -kv[1])[:8]
           for c, v in cats.items()}
    res = {"framework": a.worker, "info": info, "cpu_ms": [c * 1e3 for c in cpu], "wall_ms": [w * 1e3 for w in wall],
           "window_cpu_ms_per_step": win_cpu * 1e3 / a.steps, "window_wall_ms_per_step": win_wall * 1e3 / a.steps,
           "cpu_share": share, "rows": rows, "rows_min_wall": min_wall_rows(cats, a.steps), "top_ops": top}
    with open(a.result, "w") as f:
        json.dump(res, f, indent=1, default=str)


def min_wall_rows(cats, steps):
    """A check of the wall->CPU scaling: per category, the sum over op instances of the instance's
    SHORTEST traced duration over the profiled steps (wall >= CPU on one thread, so each term is an
    upper bound of that op's CPU, tight when one of the steps ran it without preemption)."""
    out = {}
    for c, v in cats.items():
        per = {}
        for k, ms in v:
            per.setdefault(k, []).append(ms)
        out[c] = sum(min(x) * len(x) / steps for x in per.values())
    return out


def _merge(items):
    out = {}
    for k, ms in items:
        k = re.sub(r"\.\d+\b", "", k)  # instances of one op kind together
        out[k] = out.get(k, 0.0) + ms
    return out


# ---------------------------------------------------------------------------- driver


def machine_state():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"loadavg": list(os.getloadavg()), "cpu_model": cpu, "cpus": os.cpu_count(),
            "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")}


def git_state():
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "lightflax"))}


def expected_params():
    """The study's parameter counts, as run_peers.py checks them (imported in the driver only: the
    tf.keras worker's Python has no lightflax/jax, which run_peers.py may import)."""
    sys.path.insert(0, PEERS)
    from run_peers import EXPECTED

    return EXPECTED


def run_worker(a, fw, model):
    """One worker process: one framework, one model, pinned to one core, one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", LIGHTFLAX_NATIVE_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    py = sys.executable if fw == "lightflax" else a.peers_python
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = ["taskset", "-c", str(a.core), py, os.path.abspath(__file__), f"--worker={fw}", f"--model={model}",
               f"--k={a.k}", f"--size={a.size}", f"--batch={a.batch}", f"--steps={a.steps}",
               f"--warmup={a.warmup}", f"--result={f.name}"]
        before = machine_state()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{fw} worker failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
        res = json.load(open(f.name))
    res.update(machine_before=before, machine_after=machine_state(), model=model)
    want = expected_params()[model]
    if res["info"]["total_params"] != want:
        sys.exit(f"{fw} {model}: {res['info']['total_params']} parameters, expected {want}: not the study's model")
    return res


def med_range(xs):
    return statistics.median(xs), min(xs), max(xs)


def table(runs, model):
    """Markdown: category | lightflax CPU-ms/step | tf.keras CPU-ms/step | difference (medians over runs)."""
    lf = [r for r in runs if r["model"] == model and r["framework"] == "lightflax"]
    tk = [r for r in runs if r["model"] == model and r["framework"] == "keras"]

    def cell(rs, key=None, cat=None):
        xs = [r["rows"].get(cat, 0.0) if cat else r[key] for r in rs]
        xs = [x for x in xs if x == x] or [float("nan")]  # runs without the field (older raw files)
        m, lo, hi = med_range(xs)
        return m, f"{m:.1f} ({lo:.1f}-{hi:.1f})"
    gap = statistics.median(r["window_cpu_ms_per_step"] for r in lf) - statistics.median(
        r["window_cpu_ms_per_step"] for r in tk)
    lines = ["| operation category | lightflax CPU-ms/step | tf.keras CPU-ms/step | difference | share of the gap |",
             "|---|---|---|---|---|"]
    for cat in CATS:
        (m1, c1), (m2, c2) = cell(lf, cat=cat), cell(tk, cat=cat)
        lines.append(f"| {cat} | {c1} | {c2} | {m1 - m2:+.1f} | {100 * (m1 - m2) / gap:+.0f} % |")
    for r in lf + tk:
        r["ops_ms"] = r["window_cpu_ms_per_step"] - r["rows"][OUTSIDE]
        r["ops_min_wall_ms"] = sum(r.get("rows_min_wall", {}).values()) or float("nan")
    for label, key in (("ops sum (the rows above except outside ops)", "ops_ms"),
                       ("check: ops sum bound, shortest wall per op (>= CPU)", "ops_min_wall_ms"),
                       ("**total, profiled steps**", "window_cpu_ms_per_step"), ("**total, unprofiled steps**", "cpu")):
        if key == "cpu":
            for r in lf + tk:
                r["cpu_median_ms"] = statistics.median(r["cpu_ms"])
            key = "cpu_median_ms"
        (m1, c1), (m2, c2) = cell(lf, key), cell(tk, key)
        lines.append(f"| {label} | {c1} | {c2} | {m1 - m2:+.1f} (x{m1 / m2:.2f}) | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="xray_conv2d,xray_light")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps, then as many profiled")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--peers_python", default=os.path.join(ROOT, ".venv-peers", "bin", "python"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "profile"))
    ap.add_argument("--from_json", help="print the tables of a raw result file again (no runs)")
    ap.add_argument("--worker", choices=["lightflax", "keras"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.from_json:
        if not os.path.isfile(a.from_json):
            print(f"bad input: --from_json {a.from_json} is not a file (give a benchmarks/results/profile/*.json)",
                  file=sys.stderr)
            sys.exit(2)
        return report(json.load(open(a.from_json)), a.from_json)
    models = a.models.split(",")
    bad = [m for m in models if m not in expected_params()]
    if bad or not os.path.exists(a.peers_python) or min(a.size, a.batch, a.steps, a.repeats) < 1:
        print(f"bad input: models {bad} (choose from {sorted(expected_params())}), --peers_python {a.peers_python} "
              f"(must exist: python with tensorflow + tf_keras), size/batch/steps/repeats >= 1", file=sys.stderr)
        sys.exit(2)
    start, runs = machine_state(), []
    for rep in range(a.repeats):
        for model in models:
            for fw in ("lightflax", "keras"):  # alternating: both see the same machine conditions
                runs.append(run_worker(a, fw, model) | {"repeat": rep})
                print(f"# repeat {rep} {model} {fw}: {statistics.median(runs[-1]['cpu_ms']):.0f} CPU-ms/step, "
                      f"load {runs[-1]['machine_after']['loadavg'][0]:.1f}"
                      + (f", allocator {runs[-1]['info']['allocator']}" if "allocator" in runs[-1]["info"] else ""),
                      file=sys.stderr, flush=True)
    out = {"command": " ".join(sys.argv), "args": vars(a), "git": git_state(), "machine_start": start,
           "machine_end": machine_state(), "runs": runs}
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{start['utc'][:10]}_{a.size}_{a.batch}_{int(time.time())}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    report(out, path)


def report(out, path):
    """The markdown tables of one raw result (``out`` as main writes it)."""
    a, start = argparse.Namespace(**out["args"]), out["machine_start"]
    print(f"# profile_ops {start['utc']} UTC size={a.size} batch={a.batch} repeats={a.repeats} steps={a.steps} "
          f"load {start['loadavg'][0]:.1f}->{out['machine_end']['loadavg'][0]:.1f}; median (min-max) over runs; raw: "
          f"{os.path.relpath(os.path.abspath(path), ROOT)}")
    for model in a.models.split(","):
        print(f"\n### {model}{f' K={a.k}' if model == 'xray_light' else ''}, {a.size}x{a.size}, batch {a.batch}\n")
        print(table(out["runs"], model))


if __name__ == "__main__":
    if "--worker=lightflax" in sys.argv:  # as launch.py and the peer worker start: the large-block reuse layer
        sys.path.insert(0, ROOT)
        from lightflax import startup

        startup.reexec_if_useful()
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
