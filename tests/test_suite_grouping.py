"""The suite's own scheduling: with `-n 2` and --dist loadgroup (setup.cfg), the tests that share a
module fixture run on one worker, so an expensive fixture (a training run in a subprocess) is built
once. It broke silently twice (the grouping hook ran after pytest-xdist read the marks; pytest 9 with
pytest-xdist 3.x drops the groups): every such fixture was built on both workers. This runs a
two-module toy suite, with conftest's own hook, under the installed pytest and counts the builds."""

import os
import subprocess
import sys
from pathlib import Path

CONFTEST = (Path(__file__).resolve().parent / "conftest.py").read_text()

TOY = '''
import os
import pytest


@pytest.fixture(scope="module")
def built():
    with open(os.environ["BUILDS"], "a") as f:
        f.write(f"{os.environ.get('PYTEST_XDIST_WORKER')} {__name__}\\n")
    return 1


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_uses(built, k):
    assert built == 1


def test_plain():
    pass
'''


def test_loadgroup_keeps_a_module_fixture_on_one_worker(tmp_path):
    hook = CONFTEST[CONFTEST.index("@pytest.hookimpl(tryfirst=True)\ndef pytest_collection_modifyitems"):]
    (tmp_path / "conftest.py").write_text("from pathlib import Path\n\nimport pytest\n\n\n"
                                          + hook.split("\n\n\n")[0] + "\n")
    for name in ("test_a.py", "test_b.py"):
        (tmp_path / name).write_text(TOY)
    builds = tmp_path / "builds.txt"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
                           "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "BUILDS": str(builds)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = builds.read_text().split("\n")[:-1]  # "<worker> <module>" per build, in no fixed order
    assert sorted(line.split()[1] for line in lines) == ["test_a", "test_b"], lines
