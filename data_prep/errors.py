"""The one exception type that reaches the user as a one-line message."""


class DataPrepError(Exception):
    """A problem with the user's input or settings: printed without a traceback."""
