"""The one user-facing error type of cbmir."""

from __future__ import annotations


class CbmirError(Exception):
    """An error with a message meant for the user: it names the input at fault and how to fix it.

    The CLI prints it as one ``error:`` line (exit code 2, no traceback); the HTTP service answers it
    with a 4xx JSON body.
    """
