"""The one exception type a user can cause.

The CLI turns it into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class KnnlmError(Exception):
    """A problem with the user's input or environment, explained in one line."""
