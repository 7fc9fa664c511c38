"""The whole study, end to end, timed: `python launch.py --experiment=xray_compare` (defaults)
in a fresh temporary HOME (cold caches: no data, feature or compilation cache) and workdir.

    python benchmarks/study_time.py                          # this checkout, defaults
    python benchmarks/study_time.py --clone                  # a clean clone of this checkout's HEAD
    python benchmarks/study_time.py --checkout ../main -- --epochs=2   # arguments after -- go to launch.py
    python benchmarks/study_time.py --commit 408170b -- --epochs=3     # a clean clone of another commit

Writes one JSON per run to benchmarks/results/study_time/<UTC time>-<commit>.json: the command,
commit and dirty flag, wall time of the whole command, the child's CPU time (user + system) and
peak RSS, the load average before and after, the native kernels' line, and per row (from the
study's comparison.json) its wall time, epoch loop, s/epoch, compile time and validation AUC.
``--clone`` runs from `git clone` of HEAD (committed files only) with the built native
library copied over from the checkout (a clean checkout builds it at install; without it
the rows run on XLA's kernels and the "kernels:" line says so). The machine's load is recorded,
not controlled: a figure taken beside other work is a loaded one.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "benchmarks", "results", "study_time")
ROW_KEYS = ("row_wall_s", "total_time_s", "time_per_epoch_s", "compile_time_s", "feature_extraction_s",
            "select_roc_auc", "dead")
RUN_KEYS = ("time_per_epoch_median_s", "checkpoint_time_s", "eval_compile_s", "lower_time_s", "epochs_run")


def _git(checkout: str, *args: str) -> str:
    return subprocess.run(["git", "-C", checkout, *args], capture_output=True, text=True).stdout.strip()


def _clone(checkout: str, into: str, commit: str = "") -> str:
    src = os.path.join(into, "src")
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", checkout, src], check=True)
    if commit:
        subprocess.run(["git", "-C", src, "checkout", "--quiet", commit], check=True)
    for lib in glob.glob(os.path.join(checkout, "lightflax", "native", "_lightflax_native*.so")):
        shutil.copy2(lib, os.path.join(src, "lightflax", "native"))
    if os.path.isdir(os.path.join(checkout, "..", "shared")) and not os.path.exists(os.path.join(into, "shared")):
        os.symlink(os.path.abspath(os.path.join(checkout, "..", "shared")), os.path.join(into, "shared"))
    return src


def _env(checkout: str, home: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LIGHTFLAX_", "JAX_COMPILATION_CACHE", "XDG_CACHE_HOME", "TFDS_DATA_DIR"))}
    env.update(HOME=home, PYTHONPATH=checkout, LIGHTFLAX_PROGRESS="epochs", PYTHONUNBUFFERED="1")
    return env


def _rows(workdir: str) -> list:
    path = os.path.join(workdir, "comparison.json")
    table = {"rows": []}
    if os.path.exists(path):  # else (an interrupted or failed study) the finished rows' results.json only
        with open(path) as f:
            table = json.load(f)
    runs = {}
    order = {"conv2d": 1, "transfer": 2}  # the study's row order: light_k1..k5, conv2d, transfer
    for path in sorted(glob.glob(os.path.join(workdir, "*", "results.json")),
                       key=lambda p: (order.get(os.path.basename(os.path.dirname(p)), 0), p)):
        with open(path) as f:
            runs[os.path.basename(os.path.dirname(path))] = json.load(f)
    rows = [{"label": r.get("model"), **{k: r.get(k) for k in ROW_KEYS}} for r in table["rows"]]
    rows += [{"label": None} for _ in range(len(runs) - len(rows))]
    for row, (folder, run) in zip(rows, runs.items()):  
        row.update(folder=folder, **{k: run.get(k) for k in RUN_KEYS + ("total_time_s", "time_per_epoch_s")
                                      if k in RUN_KEYS or row.get(k) is None})
    return rows


def run(checkout: str, extra: list, python: str) -> dict:
    """One timed study in a fresh HOME and workdir; returns the record."""
    with tempfile.TemporaryDirectory(prefix="study_time-") as tmp:
        home, workdir = os.path.join(tmp, "home"), os.path.join(tmp, "study")
        os.makedirs(home)
        cmd = [python, "launch.py", "--experiment=xray_compare", f"--workdir={workdir}", *extra]
        load_before, before = os.getloadavg(), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=checkout, env=_env(checkout, home), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after, load_after = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()
        lines = proc.stdout.splitlines()
        return {
            "command": " ".join(["python", *cmd[1:3], *extra]), "returncode": proc.returncode,
            "wall_s": round(wall, 2),
            "cpu_user_s": round(after.ru_utime - before.ru_utime, 2),
            "cpu_system_s": round(after.ru_stime - before.ru_stime, 2),
            "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
            # "kernels: ..." lines, also as concurrent rows print them ("[light_k5] kernels: ...")
            "kernels": sorted({ln[ln.index("kernels: "):] for ln in lines if "kernels: " in ln}),
            "rows": _rows(workdir), "study_line": next((ln for ln in lines if "study wall time" in ln), None),
            "stderr_tail": proc.stderr.splitlines()[-5:] if proc.returncode else [],
            "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "XLA_FLAGS") if os.environ.get(k)},
        }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", default=REPO, help="the checkout to run (default: this one)")
    p.add_argument("--clone", action="store_true", help="run from a clean git clone of the checkout's HEAD")
    p.add_argument("--commit", default="", help="with --clone: this commit instead of HEAD (an A/B's A)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--note", default="", help="free text recorded with the run (e.g. what else ran beside it)")
    p.add_argument("--out", default=OUT)
    p.add_argument("--allow_xla", action="store_true",
                   help="accept a run on XLA's kernels (default: exit 2 unless every row ran the native ones)")
    ns, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    checkout = os.path.abspath(ns.checkout)
    commit = _git(checkout, "rev-parse", "--short", ns.commit or "HEAD")
    dirty = bool(_git(checkout, "status", "--porcelain", "--untracked-files=no"))
    with tempfile.TemporaryDirectory(prefix="study_clone-") as tmp:
        src = _clone(checkout, tmp, ns.commit) if ns.clone or ns.commit else checkout
        record = run(src, extra, ns.python)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    record = {"date_utc": stamp.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit,
              "dirty": dirty and not (ns.clone or ns.commit), "clone": bool(ns.clone or ns.commit), "nproc": os.cpu_count(), "note": ns.note,
              **record}
    os.makedirs(ns.out, exist_ok=True)
    path = os.path.join(ns.out, f"{stamp.strftime('%Y%m%d-%H%M%S')}-{commit}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    rows = ", ".join(f"{r['label'] or r['folder']} {r.get('row_wall_s') or r.get('total_time_s') or 0:.0f} s"
                     for r in record["rows"])
    print(f"{path}: exit {record['returncode']}, {record['wall_s']:.0f} s wall, "
          f"{record['cpu_user_s'] + record['cpu_system_s']:.0f} s CPU, load {record['load_before'][0]:.1f} -> "
          f"{record['load_after'][0]:.1f}; rows: {rows}")
    if record["returncode"] == 0 and not ns.allow_xla and (
            not record["kernels"] or any(not k.startswith("kernels: native") for k in record["kernels"])):
        print(f"error: the study did not run on the native kernels ({record['kernels'] or 'no kernels line'}); "
              "build them (README) or pass --allow_xla", file=sys.stderr)
        return 2
    return record["returncode"]


if __name__ == "__main__":
    sys.exit(main())
