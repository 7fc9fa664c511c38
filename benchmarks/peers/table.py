"""The docs' peer table, rebuilt from the raw runs that run_peers.py writes.

    python benchmarks/peers/table.py benchmarks/results/peers/*.json [--repo=DIR]
    python benchmarks/peers/table.py --paste docs/speed.md   # re-build every marked table in a doc

One row per (model, size, batch, competing processes): lightflax / tf.keras, wall and process CPU
time per step, as the ratio per interleaved round (each round's figure: the median of its steps)
pooled over every round of every run given -> median and 10-90 % range (lightflax.timing.pool),
the verdict on each range (lightflax.timing.verdict: "faster" only when the whole range is below
1.0), the pooled median ms/step of each, the number of runs and rounds, the runs' dates and the range of the 1-minute load
averages recorded before and after them (the machine's other work: a loaded run is no quiet figure).
A row is marked STALE when a run behind it measured a commit after which a file that defines the
train step changed (``STEP_FILES``, ``git diff <commit> HEAD`` in --repo, default this checkout),
when the commit is unknown there, or when the run measured a tree with uncommitted changes.
The output is deterministic: the same files give byte-identical output. Files written by an
older run_peers.py (no raw rounds) are refused.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # this checkout's lightflax

from lightflax import timing  # noqa: E402
FORMAT = 2  # run_peers.py's JSON layout with raw per-round, per-step times
# Files whose change makes an earlier measurement of the train step stale.
STEP_FILES = ("lightflax/native", "lightflax/steps.py", "lightflax/layers", "lightflax/models.py",
              "lightflax/xla_defaults.py", "lightflax/huge_pages.py", "lightflax/reuse_alloc.py",
              "lightflax/startup.py")
MODEL_NAMES = {"xray_conv2d": "Conv2D", "xray_light": "LightLayers"}
HEADER = ("| model | size | batch | competing processes | tf.keras's kernels | lightflax / tf.keras wall, median (10-90 %) "
          "| CPU, median (10-90 %) | verdict wall / CPU | tf.keras ms/step | lightflax ms/step "
          "| runs (rounds) | runs' dates (UTC) | 1-min load average (runs' range) | stale |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


class BadInput(Exception):
    """A file that is not a run of this format; the message says which and why."""


def load(path):
    """One run_peers.py JSON; BadInput when unreadable or of an older format."""
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(run, dict) or run.get("format") != FORMAT:
        raise BadInput(f"{path}: not a raw-rounds run (format {FORMAT}) of benchmarks/peers/run_peers.py; "
                       f"re-run it to get one")
    return run


def is_stale(run, repo):
    """Whether the run measured a dirty tree, or a commit after which a STEP_FILES file changed in repo."""
    if run["dirty"]:
        return True
    rc = subprocess.run(["git", "diff", "--quiet", run["commit"], "HEAD", "--", *STEP_FILES], cwd=repo,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return rc != 0  # 1: changed; 128: commit unknown here


def _round_values(worker, kind):
    return [timing.round_value(r[kind]) for r in worker["rounds"]]


def collect(runs):
    """{(model, k, size, batch, contend): [(run, {worker name: worker})]} for cells with both peers."""
    cells = {}
    for run in runs:
        for cell in run["cells"]:
            workers = {w["name"]: w for w in cell["workers"]}
            if "tf.keras" in workers and "lightflax" in workers:
                key = (cell["model"], run["k"] if cell["model"] == "xray_light" else None, cell["size"],
                       run["batch"], run["contend"], keras_kernels(workers["tf.keras"]))
                cells.setdefault(key, []).append((run, workers))
    return cells


def keras_kernels(worker):
    """tf.keras's convolution kernels as its worker reported them: 'oneDNN', 'Eigen' (TensorFlow's
    oneDNN off) or 'not recorded' (workers before 2026-12-02 12:00 UTC did not report it)."""
    detail = worker.get("detail", "")
    return "oneDNN" if "oneDNN on" in detail else "Eigen" if "oneDNN off" in detail else "not recorded"


def load_range(runs):
    """The 1-minute load averages recorded before and after the runs, as 'lo-hi' ('-' when none)."""
    loads = [run[when]["loadavg"][0] for run in runs for when in ("machine_before", "machine_after")
             if isinstance(run.get(when), dict) and run[when].get("loadavg")]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"


def _fmt(p):
    return f"{p['median']:.2f} ({p['p10']:.2f}-{p['p90']:.2f})"


def row(key, entries, repo):
    """One markdown row of the table for one cell."""
    model, k, size, batch, contend, peer_kernels = key
    pooled = {}
    for kind in ("wall", "cpu"):
        pooled[kind] = timing.pool([timing.round_ratios(_round_values(w["lightflax"], kind),
                                                        _round_values(w["tf.keras"], kind)) for _, w in entries])
    ms = {name: 1e3 * timing.pool([_round_values(w[name], "wall") for _, w in entries])["median"]
          for name in ("tf.keras", "lightflax")}
    dates = ", ".join(sorted({run["date_utc"][:16].replace("T", " ") for run, _ in entries}))
    stale = "STALE" if any(is_stale(run, repo) for run, _ in entries) else ""
    name = MODEL_NAMES.get(model, model) + (f" K={k}" if k is not None else "")
    verdicts = " / ".join(timing.verdict(pooled[kind]["p10"], pooled[kind]["p90"]) for kind in ("wall", "cpu"))
    return (f"| {name} | {size}² | {batch} | {contend} | {peer_kernels} | {_fmt(pooled['wall'])} | {_fmt(pooled['cpu'])} "
            f"| {verdicts} | {ms['tf.keras']:.0f} | {ms['lightflax']:.0f} | {len(entries)} "
            f"({pooled['wall']['n_rounds']}) | {dates} | {load_range([run for run, _ in entries])} | {stale} |")


def render(runs, repo=REPO):
    """The whole table (header and rows, sorted by model, size, batch, contention) as one string."""
    cells = collect(runs)
    order = sorted(cells, key=lambda key: (key[0], key[1] or 0, key[2], key[3], key[4], key[5]))
    return "\n".join([HEADER] + [row(key, cells[key], repo) for key in order]) + "\n"


MARKER = re.compile(r"<!-- PEER TABLE: python benchmarks/peers/table\.py (\S+) -->\n\n")


def paste(doc_path, repo=REPO):
    """Replaces the table after every marker line in doc_path by table.py's output on the marker's
    files (a glob relative to repo); the doc's other text is kept byte for byte."""
    with open(doc_path) as f:
        doc = f.read()
    out, pos = [], 0
    for m in MARKER.finditer(doc):
        files = sorted(glob.glob(os.path.join(repo, m.group(1))))
        if not files:
            raise BadInput(f"{doc_path}: no run files match {m.group(1)}")
        end = doc.find("\n\n", m.end())
        end = len(doc) if end < 0 else end + 1
        out += [doc[pos:m.end()], render([load(p) for p in files], repo)]
        pos = end
    if not out:
        raise BadInput(f"{doc_path}: no '<!-- PEER TABLE: python benchmarks/peers/table.py FILES -->' marker")
    with open(doc_path, "w") as f:
        f.write("".join(out) + doc[pos:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="run_peers.py JSON files")
    ap.add_argument("--repo", default=REPO, help="git checkout whose HEAD the runs' commits are compared with")
    ap.add_argument("--paste", metavar="DOC", help="re-build the marked tables of this markdown file in place")
    a = ap.parse_args(argv)
    if bool(a.files) == bool(a.paste):
        ap.error("give run files, or --paste DOC (not both)")
    try:
        if a.paste:
            paste(a.paste, a.repo)
            return 0
        text = render([load(p) for p in a.files], a.repo)
    except BadInput as e:
        print(f"table.py: {e}", file=sys.stderr)
        return 2
    except (KeyError, ValueError) as e:
        print(f"table.py: a run file is malformed ({type(e).__name__}: {e}); re-run run_peers.py", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
