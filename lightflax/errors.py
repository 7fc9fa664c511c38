"""Every error class of the library. Those reaching the user as one line: UserError and its
subclasses (launch.py exits 2), NonFiniteLossError (exits 1)."""


class UserError(ValueError):
    """Bad input from the user: a flag, a path, a file.

    The message says what is wrong and how to fix it, in one line.
    """


class DataError(UserError):
    """A data folder or file is missing, malformed or corrupt."""


class CheckpointError(UserError):
    """A checkpoint or weight file is missing, damaged or does not fit."""


class DownloadError(DataError, CheckpointError):
    """A download failed or its checksum was wrong (data files and weights alike);
    ``reason`` is the short cause."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (launch.py exits 1). The message says what was kept: after
    good epochs the selected checkpoint, and model.msgpack/results.json written from it."""


class H5FileError(ValueError):
    """The file is not a readable Keras legacy HDF5 weight file (one line); the loaders turn it
    into a CheckpointError naming the file."""


class TorchFileError(ValueError):
    """The file is not a readable PyTorch weight file (message: one line); the loaders turn it
    into a CheckpointError naming the file."""
