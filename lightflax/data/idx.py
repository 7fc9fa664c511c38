"""Reading and writing IDX files (the original MNIST / Fashion-MNIST format), gzip or plain."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from lightflax.errors import DataError

DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read(path: Path) -> np.ndarray:
    """An IDX file (``.gz`` decompressed on the fly) as an array of its stated dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable IDX file ({type(e).__name__}: {e}); re-download it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); re-download it")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (short header); re-download it")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = DTYPES[data[2]]
    count = int(np.prod(dims))
    if len(data) - header != count * dtype.itemsize:
        raise DataError(f"{path} holds {len(data) - header} data bytes, dims {dims} need {count * dtype.itemsize}; "
                        f"re-download it")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def write(path: Path, array: np.ndarray) -> None:
    """Writes ``array`` as IDX (gzip-compressed when ``path`` ends in .gz)."""
    array = np.asarray(array)
    code = {v: k for k, v in DTYPES.items()}[array.dtype.newbyteorder(">") if array.dtype.itemsize > 1
                                               else array.dtype]
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload += array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)
