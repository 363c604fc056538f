"""Overlap the ingest stages: read batch i+1 and upsert batch i-1 while batch i is embedded.

Two small thread helpers used by :func:`cbmir.ingest.job.ingest`:

* :func:`prefetch` runs an iterator (the dataset reader: zip decompression, file decoding) in a
  background thread, ``depth`` items ahead of the consumer;
* :class:`BackgroundWriter` runs calls (the store upserts) in one background thread, in submission
  order, with at most ``max_pending`` calls queued.

Both stay in bounded memory (``depth`` batches, ``max_pending`` upserts) and propagate exceptions
to the caller: an exception of the background thread is re-raised in the caller at its next
``next()`` / ``submit()`` / ``drain()``. Leaving a ``with`` block waits for the calls already
submitted (so every upsert the caller handed over is acknowledged or has failed before the job
returns or raises), and stops the reader thread. numpy, zlib, torch and the Qdrant engine release
the GIL in their heavy calls, so the stages really overlap.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class prefetch:  # noqa: N801 - used like a function: ``with prefetch(it) as items:``
    """Iterate over ``iterable`` in a background thread, up to ``depth`` items ahead.

    Use as a context manager (``with prefetch(source.iter_batches(...)) as batches:``); leaving
    the block early stops the thread after at most one more item and closes a generator source.
    With ``depth=0`` items are produced in the caller's thread (no thread).

    Raises:
        whatever the iterator raises, in the consuming thread, at the item where it happened.
    """

    def __init__(self, iterable: Iterable, depth: int = 2) -> None:
        self._it = iter(iterable)
        self._depth = int(depth)
        self._q: queue.Queue = queue.Queue(maxsize=max(1, self._depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = False

    def _run(self) -> None:
        try:
            for item in self._it:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(_Failure(exc))
        finally:
            close = getattr(self._it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001  # pragma: no cover - best effort
                    pass

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __enter__(self) -> "prefetch":
        if self._depth > 0:
            self._thread = threading.Thread(target=self._run, name="cbmir-prefetch", daemon=True)
            self._thread.start()
        return self

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._thread is None:
            if self._depth > 0:  # used without ``with``
                self.__enter__()
                return self.__next__()
            return next(self._it)
        item = self._q.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the background thread (waits for the item being produced, if any)."""
        self._stop.set()
        self._done = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif hasattr(self._it, "close"):
            self._it.close()

    def __exit__(self, *exc) -> None:
        self.close()


class BackgroundWriter:
    """Run submitted calls in one background thread, in order, at most ``max_pending`` waiting.

    ``max_pending=0`` runs each call immediately in the caller's thread (no overlap).

    Raises:
        the first exception of a background call, in the caller, at the next :meth:`submit` or
        :meth:`drain` (later submitted calls are not run after a failure).
    """

    def __init__(self, max_pending: int = 1) -> None:
        self._max = int(max_pending)
        self._q: queue.Queue = queue.Queue(maxsize=max(1, self._max))
        self._error: BaseException | None = None
        self._failed = False
        self._thread: threading.Thread | None = None
        if self._max > 0:
            self._thread = threading.Thread(target=self._run, name="cbmir-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is _END:
                    return
                if self._error is None:
                    fn, args, kwargs = job
                    fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                self._error = exc
            finally:
                self._q.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._failed = True
            raise err

    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> None:
        """Queue ``fn(*args, **kwargs)``; blocks while ``max_pending`` calls are waiting."""
        if self._failed:
            raise RuntimeError("BackgroundWriter: an earlier call failed; nothing more is run")
        self._raise()
        if self._thread is None:
            fn(*args, **kwargs)
            return
        self._q.put((fn, args, kwargs))

    def drain(self) -> None:
        """Wait until every submitted call has run; re-raise the first failure."""
        if self._thread is not None:
            self._q.join()
        self._raise()

    def close(self) -> None:
        """Wait for the submitted calls, then stop the thread (failures are not raised here)."""
        if self._thread is not None:
            self._q.join()
            self._q.put(_END)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is None:
            self._raise()
