"""Errors that reach the user as one line (launch.py prints them and exits 2)."""


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
