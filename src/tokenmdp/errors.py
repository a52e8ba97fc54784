"""User-facing errors.

Anything a user can cause (a bad config field, a malformed data line, an unknown task, a missing model path)
raises :class:`TokenMDPError` with one clear message naming the field, file or line. The CLI prints that
message on one line, without a traceback, and exits with status 2.
"""


class TokenMDPError(ValueError):
    """An error caused by user input; its message names what is wrong and where."""
