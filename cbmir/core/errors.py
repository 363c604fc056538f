"""The one user-facing error type of cbmir."""

from __future__ import annotations


class CbmirError(Exception):
    """An error with a message meant for the user: it names the input at fault and how to fix it.

    The CLI prints it as one ``error:`` line (exit code 2, no traceback); the HTTP service answers it
    with a 4xx JSON body.
    """


class NotFoundError(CbmirError):
    """A named thing (collection, stored point) does not exist; the message lists what does.

    The HTTP service answers it with 404; everywhere else it is an ordinary :class:`CbmirError`.
    """


class StoreUnavailableError(CbmirError):
    """The store cannot be used now: a Qdrant server is unreachable or refuses cbmir's key, or (the
    subclass :class:`StoreBusyError`) another process holds a collection. Not the caller's input: the
    HTTP service answers it with 503 and ``Retry-After``."""


class StoreBusyError(StoreUnavailableError):
    """The store (or one collection of it) is held by another process and did not come free in time;
    the message names the holder."""
