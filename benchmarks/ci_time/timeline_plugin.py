"""A measurement-only pytest plugin: every xdist worker appends one JSON line per test (worker,
nodeid, start and end wall time, CPU seconds of the worker and its reaped children) to
``$CI_TIMELINE_OUT-<worker>.jsonl``. Used on a clean-clone CI run without touching the suite:

    PYTHONPATH=benchmarks/ci_time PYTEST_ADDOPTS="-p timeline_plugin" CI_TIMELINE_OUT=/tmp/tl/run bash .ci/run
    python benchmarks/ci_time/report.py /tmp/tl/run-gw*.jsonl

Shows whether the two workers stay busy to the end (the scheduling) and where the test time goes.
"""
import json
import os
import resource
import time

_started = {}


def _cpu_seconds():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_runtest_logstart(nodeid, location):
    _started[nodeid] = (time.time(), _cpu_seconds())


def pytest_runtest_logfinish(nodeid, location):
    worker, out = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("CI_TIMELINE_OUT")
    if not worker or not out or nodeid not in _started:
        return
    t0, c0 = _started.pop(nodeid)
    with open(f"{out}-{worker}.jsonl", "a") as f:
        f.write(json.dumps({"w": worker, "id": nodeid, "t0": t0, "t1": time.time(), "cpu": _cpu_seconds() - c0}) + "\n")
