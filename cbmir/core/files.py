"""Atomic file writes and advisory file locks (POSIX ``fcntl.flock``).

A reader never sees a half-written file: data goes to a temporary file in the same folder, is flushed
and fsynced, then renamed over the target (``os.replace`` is atomic on one file system).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO

from cbmir.core.errors import CbmirError

try:  # advisory locks are POSIX; elsewhere they are no-ops
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, mode: int = 0o644) -> None:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary binary file beside it, which then
    replaces ``path``. On any error (or Ctrl-C) the temporary file is removed and ``path`` is untouched.

    Example::

        atomic_write("table.csv", lambda fh: fh.write(b"a,b\\n1,2\\n"))
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        os.chmod(tmp, mode)  # mkstemp creates 0600; these are ordinary shared files
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of UTF-8 ``text``."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def save_npz_atomic(path: str | os.PathLike, **arrays) -> None:
    """``numpy.savez`` of ``arrays`` to exactly ``path`` (no ``.npz`` appended), atomically."""
    import numpy as np

    atomic_write(path, lambda fh: np.savez(fh, **arrays))


class FileLock:
    """Exclusive, non-blocking advisory lock on ``path`` for the duration of a ``with`` block.

    Args:
        path: the lock file (created if missing).
        busy: the :class:`CbmirError` message when another process holds it.

    Raises:
        CbmirError: another process (or another open ``FileLock`` on the same file) holds it.
    """

    def __init__(self, path: str | os.PathLike, busy: str) -> None:
        self.path = Path(path)
        self.busy = busy
        self._fh = None

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._fh.close()
                self._fh = None
                raise CbmirError(self.busy) from None
        return self

    def __exit__(self, *exc) -> bool:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor releases the flock
            self._fh = None
        return False
