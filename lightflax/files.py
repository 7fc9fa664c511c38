"""Files: the one atomic write, cache-directory resolver and checksum-verified download.

    files.atomic_write(path, lambda f: f.write(data))      # all or nothing
    files.cache_dir("weights")                             # $LIGHTFLAX_WEIGHTS_DIR or ~/.cache/lightflax/weights
    files.download(url, dest, digest)                      # md5 or sha256, checked before the file appears

Every file lightflax writes that a crash must not leave half-written
(results.json, exported models, predictions, feature caches, downloads) goes
through :func:`atomic_write`: a temporary file in the same folder, fsynced,
then renamed over the target.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from typing import IO, Callable, Iterator, Optional

from lightflax.errors import DownloadError, UserError

DEFAULT_TIMEOUT_S = 10.0

# kind -> (environment variable that moves it, sub-folder under that variable's folder)
_CACHES = {"data": ("LIGHTFLAX_DATA_DIR", ""), "weights": ("LIGHTFLAX_WEIGHTS_DIR", ""),
           "features": ("LIGHTFLAX_CACHE_DIR", "features"), "jax": ("LIGHTFLAX_CACHE_DIR", "jax")}


def user_cache(kind: str) -> str:
    """``$XDG_CACHE_HOME/lightflax/<kind>`` (default ``~/.cache/lightflax/<kind>``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lightflax", kind)


def cache_dir(kind: str) -> str:
    """Where lightflax caches ``kind`` ('data', 'weights', 'features' or 'jax': compiled programs).

    data: $LIGHTFLAX_DATA_DIR; weights: $LIGHTFLAX_WEIGHTS_DIR; features, jax:
    $LIGHTFLAX_CACHE_DIR/<kind>; else :func:`user_cache` of the kind.
    """
    if kind not in _CACHES:
        raise ValueError(f"cache kind must be one of {', '.join(_CACHES)}, got {kind!r}")
    env, sub = _CACHES[kind]
    if os.environ.get(env):
        return os.path.join(os.path.expanduser(os.environ[env]), sub) if sub else os.path.expanduser(os.environ[env])
    return user_cache(kind)


def atomic_write(path: str, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Writes ``path`` through ``write(file)`` all or nothing: a temporary file in the same
    folder, fsynced, renamed over ``path``. On any error the temporary file is removed,
    ``path`` is untouched and the error propagates."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_digest(path: str, algorithm: str) -> str:
    """Hex digest ('md5', 'sha256', ...) of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _urlopen_fetch(url: str, dest: IO, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - fixed https/file URLs
        for chunk in iter(lambda: r.read(1 << 20), b""):
            dest.write(chunk)


class _HashingWriter:
    """A binary file that hashes what is written to it."""

    def __init__(self, f: IO, algorithm: str):
        self.f, self.hash = f, hashlib.new(algorithm)

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.f.write(data)


# Replaceable in tests: fetch(url, writable binary file, timeout_s).
FETCH: Callable[[str, IO, float], None] = _urlopen_fetch


def download(url: str, dest: "str | os.PathLike", digest: str, *, algorithm: Optional[str] = None,
             timeout: Optional[float] = None) -> str:
    """Downloads ``url`` to ``dest`` if its checksum is ``digest``; returns the path.

    ``algorithm``: 'md5' or 'sha256'; default as Keras' get_file: 64 hex digits
    -> sha256, else md5. Timeout: ``timeout`` or $LIGHTFLAX_DOWNLOAD_TIMEOUT
    (seconds, default 10). Nothing is left behind on failure. Raises
    :class:`lightflax.errors.DownloadError` (one line) when offline or on a wrong checksum.
    """
    dest = os.fspath(dest)
    folder = os.path.dirname(os.path.abspath(dest))
    algorithm = algorithm or ("sha256" if len(digest) == 64 else "md5")
    if timeout is None:
        timeout = float(os.environ.get("LIGHTFLAX_DOWNLOAD_TIMEOUT", DEFAULT_TIMEOUT_S))

    def fetch(f):
        hashing = _HashingWriter(f, algorithm)
        FETCH(url, hashing, timeout)
        got = hashing.hash.hexdigest()
        if got != digest:
            reason = f"{algorithm} {got}, expected {digest}"
            raise DownloadError(f"download of {url} has {reason}; nothing was cached - retry, "
                                f"or download it yourself into {folder}", reason)

    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the download folder {folder} ({e.strerror}); point the cache's "
                            f"environment variable at a writable folder", e.strerror or "") from None
    try:
        atomic_write(dest, fetch)
    except DownloadError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
        raise DownloadError(f"cannot download {url} ({reason}); offline? put the file in {folder} "
                            f"or pass its path", reason) from None
    return dest


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds an exclusive lock on ``workdir`` (``workdir/.lock``, flock) for the block: a second
    run on the same folder stops with one line instead of corrupting the first one's files.
    The kernel drops the lock when the process ends, however it ends."""
    path = os.path.join(workdir, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UserError(f"--workdir {workdir} is in use by another run (pid {holder}); wait for it to end "
                        f"or choose another --workdir") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
