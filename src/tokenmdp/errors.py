"""User-facing errors.

Anything a user can cause (a bad config field, a malformed data line, an unknown task, a missing model path)
raises :class:`TokenMDPError` with one clear message naming the field, file or line. The CLI prints that
message on one line, without a traceback, and exits with status 2.
"""


class TokenMDPError(ValueError):
    """An error caused by user input; its message names what is wrong and where."""


class WriteError(TokenMDPError, OSError):
    """A folder could not be written (a full disk, a quota, a read-only file system): the user can fix it, so the
    CLI prints it as one line; it is also an ``OSError`` for callers that handle those."""
