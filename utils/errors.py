"""The one base class of errors a user can fix.

Every command's ``main`` catches ``UserError`` and prints its message as one
``error: ...`` line, exit status 2, no traceback. The message names the problem
and the fix. Library code raises a subclass (``DataError``, ``CheckpointError``,
...) so a caller can still tell them apart.
"""


class UserError(Exception):
    """Bad input or settings; the message says what is wrong and what to do instead."""
