"""The one exception type the ``memloc`` command turns into a one-line error and exit code 2."""


class MemlocError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
