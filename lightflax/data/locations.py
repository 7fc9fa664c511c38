"""Where datasets are looked for, cached and downloaded to.

Search order (see the package docstring): an explicit ``--data_dir`` /
``--manual_dir``; env ``LIGHTFLAX_DATA_DIR``; ``$XDG_CACHE_HOME/lightflax/data``
(default ``~/.cache/lightflax/data``); dataset-specific places (the shared
PneumoniaMNIST folder, Debian's Fashion-MNIST package).
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Iterable, Optional

from lightflax.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    """Root of lightflax's data cache (downloads, prepared TFDS files)."""
    if os.environ.get("LIGHTFLAX_DATA_DIR"):
        return Path(os.environ["LIGHTFLAX_DATA_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lightflax" / "data"


def shared_dir() -> Path:
    """The project's shared folder (env LIGHTFLAX_SHARED_DIR, default <repo>/../shared)."""
    return Path(os.environ.get("LIGHTFLAX_SHARED_DIR") or REPO.parent / "shared").expanduser()


def fingerprint(parts: Iterable[object]) -> str:
    """A short stable hash of ``parts`` (names the prepared copy of one source)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def file_fingerprint(path: Path) -> str:
    """Identity of a source file: resolved path, size and modification time."""
    st = path.stat()
    return fingerprint((str(path.resolve()), st.st_size, st.st_mtime_ns))


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, *, algorithm: str, digest: str, timeout: float = 30.0) -> Path:
    """Downloads ``url`` to ``dest`` atomically and checks its checksum.

    Raises DataError (one line) when offline or when the checksum does not match;
    nothing is left behind in either case.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({type(e).__name__}: {e}); download it by hand into "
                        f"{dest.parent}") from None
    got = file_digest(tmp, algorithm)
    if got != digest:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url} downloaded with {algorithm} {got}, expected {digest}; try again or download it "
                        f"by hand into {dest.parent}")
    os.replace(tmp, dest)
    return dest


def prepared_dir(data_dir: Optional[str], kind: str, key: str) -> Path:
    """TFDS data_dir for one prepared source: ``<data_dir or cache>/tfds/<kind>-<key>``."""
    return Path(data_dir or cache_root()).expanduser() / "tfds" / f"{kind}-{key}"
