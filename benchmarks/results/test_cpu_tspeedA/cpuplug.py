import os, resource, time, json
import pytest
_OUT = os.environ.get("CPUPLUG_OUT", "/tmp/tsa/cpu.jsonl")
def _cpu():
    s = resource.getrusage(resource.RUSAGE_SELF); c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    c0, t0 = _cpu(), time.time()
    yield
    with open(_OUT, "a") as f:
        f.write(json.dumps({"id": item.nodeid, "cpu": round(_cpu() - c0, 1), "wall": round(time.time() - t0, 1)}) + "\n")
