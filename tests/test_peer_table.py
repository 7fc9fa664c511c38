"""benchmarks/peers/table.py: the docs' peer table rebuilt from raw runs, rows checked exactly."""

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("peer_table", REPO / "benchmarks" / "peers" / "table.py")
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A tiny git repo: commit A, then B changes a step-defining file, then C changes only a doc."""
    r = tmp_path / "repo"
    (r / "lightflax").mkdir(parents=True)
    git(r, "init", "-q")
    git(r, "config", "user.email", "t@example.com")
    git(r, "config", "user.name", "t")
    commits = []
    for i, (path, text) in enumerate([("lightflax/steps.py", "a\n"), ("lightflax/steps.py", "b\n"),
                                      ("README.md", "doc\n")]):
        (r / path).write_text(text)
        git(r, "add", "-A")
        git(r, "commit", "-qm", f"c{i}")
        commits.append(git(r, "rev-parse", "HEAD"))
    return r, commits


def worker(name, walls, cpus):
    """One worker's raw rounds: two steps per round, the round's figure is their median (mean of two)."""
    return {"name": name, "detail": name, "params": 1, "rounds": [{"wall": [w, w], "cpu": [c, c]}
                                                                  for w, c in zip(walls, cpus)]}


def run(commit, date, tf_walls, lf_walls, contend=0, dirty=False, model="xray_conv2d", size=128):
    cell = {"model": model, "size": size,
            "workers": [worker("tf.keras", tf_walls, tf_walls), worker("lightflax", lf_walls,
                                                                      [2 * w for w in lf_walls])]}
    state = {"loadavg": [0.5 + contend, 0.4, 0.3]}
    return {"format": 2, "commit": commit, "dirty": dirty, "date_utc": date, "batch": 32, "k": 5,
            "contend": contend, "cells": [cell], "machine_before": state,
            "machine_after": {"loadavg": [1.25 + contend + 1.0 * dirty, 0.4, 0.3]}}


def write(tmp_path, runs):
    paths = []
    for i, r in enumerate(runs):
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps(r))
        paths.append(str(p))
    return paths


def test_rows_pool_every_round_of_every_run_and_mark_stale(tmp_path, repo, capsys):
    r, (a, b, c) = repo
    runs = [
        # Conv2D 128: two runs at commit B (only a doc changed since: fresh); ratios 0.5,1.0,1.5 and 1.0,2.0
        run(b, "2026-12-02T06:40:00Z", [0.2, 0.1, 0.1], [0.1, 0.1, 0.15]),
        run(c, "2026-12-02T07:45:10Z", [0.1, 0.1], [0.1, 0.2]),
        # LightLayers 224, contended, one run at commit A (steps.py changed since: stale)
        run(a, "2026-12-01T10:00:00Z", [0.4, 0.4], [0.2, 0.32], contend=1, model="xray_light", size=224),
        # Conv2D 64 from a dirty tree: stale
        run(c, "2026-12-02T08:00:00Z", [0.1], [0.05], dirty=True, size=64),
    ]
    assert table.main([*write(tmp_path, runs), f"--repo={r}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == table.HEADER.splitlines()
    # Conv2D 128: wall ratios 0.5, 1, 1, 1.5, 2 -> median 1.0, p10 0.7, p90 1.8; CPU ratios twice those.
    # LightLayers: ratios 0.5, 0.8 -> median 0.65, p10 0.53, p90 0.77; its lightflax ms: median of 200, 320
    assert lines[2:] == [
        "| Conv2D | 64² | 32 | 0 | not recorded | 0.50 (0.50-0.50) | 1.00 (1.00-1.00) | faster / at par | 100 | 50 | 1 (1) "
        "| 2026-12-02 08:00 | 0.5-2.2 | STALE |",
        "| Conv2D | 128² | 32 | 0 | not recorded | 1.00 (0.70-1.80) | 2.00 (1.40-3.60) | at par / slower | 100 | 100 | 2 (5) "
        "| 2026-12-02 06:40, 2026-12-02 07:45 | 0.5-1.2 |  |",
        "| LightLayers K=5 | 224² | 32 | 1 | not recorded | 0.65 (0.53-0.77) | 1.30 (1.06-1.54) | faster / slower | 400 | 260 "
        "| 1 (2) | 2026-12-01 10:00 | 1.5-2.2 | STALE |",
    ]


def test_tf_keras_with_and_without_onednn_are_separate_rows(tmp_path, repo, capsys):
    """TensorFlow runs oneDNN by default only on some CPUs: a run whose tf.keras worker reported
    'oneDNN on' is never pooled with one that reported 'oneDNN off' (or nothing)."""
    r, (_, b, c) = repo
    runs = [run(c, "2026-12-02T12:00:00Z", [0.2], [0.1]), run(c, "2026-12-02T12:30:00Z", [0.1], [0.1]),
            run(c, "2026-12-02T13:00:00Z", [0.4], [0.1])]
    runs[0]["cells"][0]["workers"][0]["detail"] = "tf.keras 2.21.0, oneDNN on"
    runs[1]["cells"][0]["workers"][0]["detail"] = "tf.keras 2.21.0, oneDNN off"
    assert table.main([*write(tmp_path, runs), f"--repo={r}"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split(" | ")[4] for row in rows] == ["Eigen", "not recorded", "oneDNN"]
    assert [row.split(" | ")[5] for row in rows] == ["1.00 (1.00-1.00)", "0.25 (0.25-0.25)", "0.50 (0.50-0.50)"]


def test_same_input_gives_identical_output(tmp_path, repo, capsys):
    r, (_, b, c) = repo
    paths = write(tmp_path, [run(b, "2026-12-02T06:40:00Z", [0.2, 0.1], [0.1, 0.1]),
                             run(c, "2026-12-02T07:45:00Z", [0.1, 0.3], [0.1, 0.2])])
    table.main([*paths, f"--repo={r}"])
    first = capsys.readouterr().out
    table.main([*reversed(paths), f"--repo={r}"])
    assert capsys.readouterr().out == first


def test_unknown_commit_is_stale(tmp_path, repo, capsys):
    r, _ = repo
    table.main([*write(tmp_path, [run("0" * 40, "2026-12-02T06:40:00Z", [0.1], [0.1])]), f"--repo={r}"])
    assert capsys.readouterr().out.splitlines()[-1].endswith("| STALE |")


def test_old_format_is_refused_in_one_line(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{"model": "xray_conv2d", "size": 128, "ms_per_step": 100.0}]))
    assert table.main([str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a raw-rounds run" in err


def _run_peers():
    spec = importlib.util.spec_from_file_location("run_peers", REPO / "benchmarks" / "peers" / "run_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_contenders_are_killed_also_on_error():
    run_peers = _run_peers()
    with pytest.raises(RuntimeError, match="boom"):
        with run_peers.Contenders(2, 60.0) as contenders:
            procs = list(contenders.procs)
            raise RuntimeError("boom")
    assert len(procs) == 2 and all(p.poll() is not None for p in procs)
    assert contenders.alive_at_end == [True, True]  # they were still spinning when the cell ended


@pytest.mark.parametrize("flag", ["--contend=-1", "--sizes=12x", "--models=resnet", "--rounds=0"])
def test_run_peers_refuses_bad_flags(flag, capsys):
    with pytest.raises(SystemExit) as e:
        _run_peers().parse_args([flag])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_docs_peer_table_is_table_py_on_the_committed_runs():
    """Every peer table in docs/speed.md is the verbatim output of the command in its marker line, on the
    committed raw runs that the marker's pattern names: a new run, a changed train step (STALE rows) or
    a hand edit shows up here. The current table reads benchmarks/results/peers/*.json; earlier
    programs' tables read their archived runs from a sub-folder."""
    doc = (REPO / "docs" / "speed.md").read_text()
    markers = re.findall(r"<!-- PEER TABLE: python benchmarks/peers/table\.py (\S+) -->\n\n", doc)
    assert "benchmarks/results/peers/*.json" in markers
    for pattern in markers:
        runs = sorted(REPO.glob(pattern))
        assert runs, f"no run files match {pattern}"
        if subprocess.run(["git", "cat-file", "-e", f"{table.load(str(runs[0]))['commit']}^{{commit}}"], cwd=REPO,
                          capture_output=True).returncode != 0:
            pytest.skip("the runs' commits are not in this checkout's history (a shallow clone): staleness unknown")
        marker = f"<!-- PEER TABLE: python benchmarks/peers/table.py {pattern} -->\n\n"
        published = doc.split(marker, 1)[1].split("\n\n", 1)[0] + "\n"
        assert published == table.render([table.load(str(p)) for p in runs], str(REPO)), pattern


def test_paste_rebuilds_every_marked_table_and_keeps_the_rest(tmp_path):
    """table.py --paste replaces only the block after each marker line (an old table, a hand edit)."""
    pattern = "benchmarks/results/peers/2026-12-02-onednn26-openmp/*.json"  # committed runs that do not change
    marker = f"<!-- PEER TABLE: python benchmarks/peers/table.py {pattern} -->\n\n"
    doc = tmp_path / "doc.md"
    doc.write_text("# title\n\n" + marker + "| old | table |\n|---|---|\n| 1 | 2 |\n\ntext after\n")
    assert table.main(["--paste", str(doc)]) == 0
    runs = sorted(REPO.glob(pattern))
    want = "# title\n\n" + marker + table.render([table.load(str(p)) for p in runs], str(REPO)) + "\ntext after\n"
    assert doc.read_text() == want
    doc.write_text("no marker here\n")
    with pytest.raises(table.BadInput, match="no '<!-- PEER TABLE"):
        table.paste(str(doc))
