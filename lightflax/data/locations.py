"""Where datasets are looked for, cached and downloaded to.

Search order (see the package docstring): an explicit ``--data_dir`` /
``--manual_dir``; env ``LIGHTFLAX_DATA_DIR``; ``$XDG_CACHE_HOME/lightflax/data``
(default ``~/.cache/lightflax/data``); dataset-specific places (the PneumoniaMNIST
copy embedded in the package, Debian's Fashion-MNIST package).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

from lightflax import files
from lightflax.files import download, file_digest  # noqa: F401  (the one downloader, used by the loaders)



def cache_root() -> Path:
    """Root of lightflax's data cache (downloads, prepared TFDS files): ``files.cache_dir("data")``."""
    return Path(files.cache_dir("data"))


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


def prepared_dir(data_dir: Optional[str], kind: str, key: str) -> Path:
    """TFDS data_dir for one prepared source: ``<data_dir or cache>/tfds/<kind>-<key>``."""
    return Path(data_dir or cache_root()).expanduser() / "tfds" / f"{kind}-{key}"
