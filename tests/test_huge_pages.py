"""lightflax.huge_pages: when entry points re-execute with glibc's huge-page tunable, and that they do."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from lightflax import huge_pages


@pytest.mark.parametrize(
    "environ, glibc, thp, expected",
    [
        ({}, (2, 36), "madvise", None),  # opt-in: off by default
        ({"LIGHTFLAX_HUGE_PAGES": "0"}, (2, 36), "madvise", None),
        ({"LIGHTFLAX_HUGE_PAGES": "1"}, (2, 36), "madvise", "glibc.malloc.hugetlb=1"),
        ({"LIGHTFLAX_HUGE_PAGES": "1", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise",
         "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ({"LIGHTFLAX_HUGE_PAGES": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise",
         None),  # the user's own setting; no loop
        ({"LIGHTFLAX_HUGE_PAGES": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise",
         None),  # after the re-exec
        ({"LIGHTFLAX_HUGE_PAGES": "1"}, (2, 31), "madvise", None),  # glibc without the tunable
        ({"LIGHTFLAX_HUGE_PAGES": "1"}, None, "madvise", None),  # not glibc
        ({"LIGHTFLAX_HUGE_PAGES": "1"}, (2, 36), "never", None),
        ({"LIGHTFLAX_HUGE_PAGES": "1"}, (2, 36), "always", None),  # huge pages already
        ({"LIGHTFLAX_HUGE_PAGES": "1"}, (2, 36), None, None),  # no THP file
    ],
)
def test_tunables_to_use(environ, glibc, thp, expected):
    assert huge_pages.tunables_to_use(environ, glibc, thp) == expected


CHILD = (
    "import json, os, sys; sys.path.insert(0, {repo!r}); from lightflax import startup; "
    "startup.reexec_if_useful(); "
    "print(json.dumps([os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:]]))"
)


def test_reexec_keeps_pid_and_arguments_and_runs_once():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env[huge_pages.ENV_SWITCH] = "1"
    code = CHILD.format(repo=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code, "a b", "--x=1"], env=env, stdout=subprocess.PIPE,
                            text=True)
    out, _ = proc.communicate(timeout=120)
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # the program's work ran once (in the re-executed process only)
    pid, tunables, args = json.loads(lines[0])
    assert pid == proc.pid and args == ["a b", "--x=1"]
    expected = huge_pages.tunables_to_use(env, huge_pages._glibc_version(), huge_pages._thp_mode())
    assert tunables == expected  # set where this machine can use it, else untouched (None)
    for switch in ("0", None):  # off, and the default (off)
        e = dict(env, LIGHTFLAX_HUGE_PAGES=switch) if switch else {k: v for k, v in env.items()
                                                                   if k != huge_pages.ENV_SWITCH}
        off = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)
        assert json.loads(off.stdout)[1] is None
