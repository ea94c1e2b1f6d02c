"""The one exception type for failures a user can fix.

The CLIs catch it and print its message as a single line on stderr; anything else is a bug and keeps
its traceback.
"""


class FdError(Exception):
    """A user-facing failure whose message names the problem and the fix."""
