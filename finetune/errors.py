"""The one exception type that reaches the user as a one-line message."""


class FinetuneError(Exception):
    """A problem with the user's input or settings, found before any training: printed as
    one line without a traceback, exit code 2."""
