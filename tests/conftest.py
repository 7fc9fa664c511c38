import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent


def _session_compilation_cache() -> None:
    """One JAX persistent compilation cache for the whole test session: the xdist workers and every
    launch.py / python -c subprocess inherit it through the environment, so the many runs that compile
    the same small models compile each program once. A fresh empty folder per session, removed at its
    end: nothing is reused across sessions.
    Entries are keyed by the program, JAX/XLA versions, flags and devices, so a hit is the same
    executable. A maximum size turns on JAX's file lock, so no process reads a half-written entry.
    Only programs that took >= 0.25 s to compile are kept: with every eager operation cached (a
    threshold of 0) the folder grew to thousands of entries, and JAX scans the whole folder under
    the lock on every write, so writes took seconds, other processes timed out on the lock and a CI
    run took 82 minutes instead of 18."""
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("LIGHTFLAX_TEST_JAX_CACHE"):
        return  # an xdist worker: the controller's folder came with the environment
    folder = tempfile.mkdtemp(prefix="lightflax-test-jax-cache-")
    atexit.register(shutil.rmtree, folder, True)
    os.environ["LIGHTFLAX_TEST_JAX_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.25"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)


_session_compilation_cache()
# Two xdist workers share the CI's two cores: one OpenMP thread per native call (the automatic
# choice would give each worker both cores). Inherited by every subprocess; tests time nothing.
os.environ.setdefault("LIGHTFLAX_NATIVE_THREADS", "1")


def shared_dir() -> Path:
    return Path(os.environ.get("LIGHTFLAX_SHARED_DIR", REPO.parent / "shared"))


def launch_env(devices: int = 1, env=None):
    """The environment of a launch.py child process in the tests (every caller compiles the same
    programs, so their numbers agree)."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("JAX_PLATFORMS", "cpu")
    # End-to-end runs test behaviour, not speed: skip most XLA optimisation passes
    # (as the Flax examples' tests do) to cut compile time.
    e.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    if env:
        e.update(env)
    return e


def run_launch(args, *, devices: int = 1, env=None, timeout=600, check=None, cwd=None):
    """Runs launch.py in a fresh process (flags are process-global)."""
    e = launch_env(devices, env)
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=cwd or REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)
    if check is not None and proc.returncode != check:
        raise AssertionError(f"exit {proc.returncode} (expected {check})\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def run_python(code: str, *, devices: int = 1, timeout=600, env=None):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e.setdefault("JAX_PLATFORMS", "cpu")
    if env:
        e.update(env)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def idx_folder(folder: Path, n_train: int = 30, n_test: int = 8, seed: int = 3):
    """Writes a tiny MNIST-layout IDX folder (random 28x28 images, labels 0..9 cycling) and returns
    {'train': (images, labels), 'test': (images, labels)}."""
    import numpy as np

    from lightflax.data import idx

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        idx.write(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        idx.write(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out


def separable_npz(path: Path, sizes=(("train", 96), ("val", 48), ("test", 48)), seed: int = 0):
    """Writes a PneumoniaMNIST-layout npz (28x28 uint8, labels (N, 1)) that a model can learn in a few
    steps: class 1 images carry a bright 10x10 square at a random place on the noise that both
    classes share. Returns {split: (images, labels)}."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out, arrays = {}, {}
    for split, n in sizes:
        images = rng.integers(0, 120, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 2).astype(np.uint8)
        for i in np.flatnonzero(labels):
            y, x = rng.integers(0, 19, 2)
            images[i, y:y + 10, x:x + 10] = rng.integers(200, 256, (10, 10), dtype=np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
        out[split] = (images, labels)
    np.savez(path, **arrays)
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """With `-n 2` and --dist loadgroup (setup.cfg), the tests of a file that share one of its module- or
    session-scoped fixtures (a training run, a loaded network) run on one worker, so the fixture is
    built once, not once per worker; every other test is handed out on its own. tryfirst: pytest-xdist's
    worker reads the marks in its own hook of this name, which otherwise runs before this one
    (tests/test_suite_grouping.py)."""
    import inspect

    here = Path(__file__).resolve().parent
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        for defs in (info.name2fixturedefs.values() if info else ()):
            fixture = defs[-1]
            if fixture.scope in ("module", "session") and Path(inspect.getfile(fixture.func)).parent == here:
                item.add_marker(pytest.mark.xdist_group(item.path.name))
                break
