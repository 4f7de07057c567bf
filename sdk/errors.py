"""User-facing errors.

Every error a user can cause (bad option, bad file, missing provider) is an `EdgeRecoverError`: its message
is one line that names the parameter, the value and the fix. The CLI prints it to stderr and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgeRecoverError(Exception):
    """An error caused by user input; its message is one line that says what to do instead."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise `EdgeRecoverError(message)` unless `condition` holds.

    Example:
        >>> require(bits in (2, 4, 8), f"`bits` must be 2, 4 or 8, got {bits}")  # doctest: +SKIP
    """
    if not condition:
        raise EdgeRecoverError(message)
