"""The application context: settings, one open store and the embedders built for it.

Every entry point (CLI command, benchmark grid, :class:`cbmir.client.SearchClient`, HTTP service) holds
one :class:`App` and calls the functions of :mod:`cbmir.app` with it, so one request gives one answer
everywhere.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from cbmir.core.errors import CbmirError
from cbmir.core.settings import Settings, get_settings

#: settings field -> its CLI option, for messages about invalid values
log = logging.getLogger("cbmir.app")

SETTING_OPTIONS = {"distance": "--distance", "batch_size": "--batch-size", "data_dir": "--data-dir",
                   "store_path": "--store-path", "qdrant_url": "--qdrant-url", "device": "--device",
                   "precision": "--precision", "torch_compile": "--torch-compile",
                   "threads": "--threads", "qdrant_shard_number": "--shard-number",
                   "qdrant_replication_factor": "--replication-factor",
                   "qdrant_write_consistency_factor": "--write-consistency-factor",
                   "qdrant_read_consistency": "--read-consistency", "qdrant_prefer_grpc": "--prefer-grpc"}


def file_on_path(p: Path) -> Path | None:
    """``p`` or the first of its parents that exists and is not a directory (it blocks creating ``p``)."""
    return next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)


def load_settings(**overrides) -> Settings:
    """:class:`~cbmir.core.settings.Settings` from ``CBMIR_*`` variables and ``.env``, with the non-None
    ``overrides`` (CLI flags, service options) on top, checked.

    Raises:
        CbmirError: an invalid value, naming the option, the variable and the valid values; a Qdrant URL
            without scheme; an embedded store path blocked by a file.
    """
    from pydantic import ValidationError

    try:
        s = get_settings(**overrides)
    except ValidationError as exc:
        raise CbmirError("; ".join(_setting_problem(e) for e in exc.errors())) from None
    if s.qdrant_url and not str(s.qdrant_url).lower().startswith(("http://", "https://")):
        raise CbmirError(f"--qdrant-url / CBMIR_QDRANT_URL {s.qdrant_url!r} has no scheme: give a full URL such as "
                         f"http://{s.qdrant_url}, or drop --qdrant-url to use the embedded store")
    if s.qdrant_read_consistency is not None:
        from cbmir.search.cluster import parse_read_consistency

        parse_read_consistency(s.qdrant_read_consistency)  # all | majority | quorum | N, else CbmirError
    if not s.qdrant_url:
        sp = Path(s.store_path).expanduser()
        bad = file_on_path(sp)
        if bad is not None:
            raise CbmirError(f"--store-path / CBMIR_STORE_PATH {sp}: {bad} is a file, not a directory; give a "
                             "directory (it is created if missing)")
    return s


def _setting_problem(e: dict) -> str:
    field = str(e["loc"][0]) if e.get("loc") else "?"
    opt = SETTING_OPTIONS.get(field)
    where = f"{opt} / CBMIR_{field.upper()}" if opt else f"CBMIR_{field.upper()}"
    ctx = e.get("ctx") or {}
    if e.get("type") == "literal_error":
        valid = f"valid: {ctx.get('expected', '').replace(chr(39), '')}"
    elif "ge" in ctx:
        valid = f"must be {'a number' if isinstance(ctx['ge'], float) else 'an integer'} >= {ctx['ge']:g}"
    elif "gt" in ctx:
        valid = f"must be > {ctx['gt']}"
    else:
        valid = e.get("msg", "invalid")
    return f"invalid {where} value {e.get('input')!r}: {valid}"


def check_same_weights(meta, embedder) -> None:
    """Refuse an embedder whose weights are not those that built the collection (``meta.weights``: a file's
    SHA-256, or a hub repository with its resolved revision): its vectors would not match the stored ones.

    Raises:
        CbmirError: naming both weights identities and the fixes.
    """
    have = str(embedder.identity().get("weights", "none"))
    if have != meta.weights:
        raise CbmirError(
            f"model {meta.model!r} now loads weights {have}, but the collection was built with {meta.weights}: "
            "queries embedded with other weights do not match its points. Use the same weights (--weights "
            "FILE, or the hub revision it was built with), or rebuild the collection with `cbmir ingest "
            "--recreate`.")


class App:
    """Settings, the store they name (opened on first use) and a cache of embedders.

    Args:
        settings: default :func:`load_settings` ``()``.
        store: an open :class:`cbmir.search.store.VectorStore` to use instead of opening one.

    Use as a context manager, or call :meth:`close`. Thread-safe for concurrent searches (the service):
    the store is opened once, and each embedder is built once under a lock.

    **Sharing an embedded store with other processes** (the service): wrap each request in
    :meth:`using_store` and call :meth:`start_idle_release`; once no request has run for the idle time,
    the store's collections are released (their shards closed, their locks freed), so a ``cbmir ingest``
    / ``evaluate`` / ``search`` in another process gets them. The next request opens them again (and
    then reads the points that process wrote).
    """

    def __init__(self, settings: Settings | None = None, store=None) -> None:
        self.settings = settings or load_settings()
        self._store = store
        self._embedders: dict[tuple, object] = {}
        self._collapse: dict[tuple, str | None] = {}
        self._cache: dict[tuple, object] = {}
        self._lock = threading.Lock()
        self._use = threading.Condition()
        self._active = 0
        self._last_use = time.monotonic()
        self._releases = 0
        self._stop = threading.Event()
        self._releaser: threading.Thread | None = None

    @property
    def store(self):
        """The open vector store (embedded Qdrant Edge, or a Qdrant server when ``qdrant_url`` is set)."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    from cbmir.search.store import open_store

                    self._store = open_store(self.settings)
        return self._store

    def cached(self, key: tuple, build: Callable[[], object]):
        """``build()`` once per ``key`` for the life of this app (dataset readers for images, archive
        sources); thread-safe."""
        with self._lock:
            if key not in self._cache:
                self._cache[key] = build()
            return self._cache[key]

    @contextmanager
    def using_store(self) -> Iterator[object]:
        """The store, held open for the duration of the ``with`` block (one request): an idle release
        (:meth:`release_if_idle`) waits until no block is running, and a block waits for a release in
        progress."""
        with self._use:
            self._active += 1
        try:
            yield self.store
        finally:
            with self._use:
                self._active -= 1
                self._last_use = time.monotonic()

    def release_if_idle(self, idle_s: float) -> bool:
        """Release the store's open collections (:meth:`cbmir.search.store.VectorStore.release`) when no
        :meth:`using_store` block runs and none ended in the last ``idle_s`` seconds.

        Returns:
            True when something was released.
        """
        with self._use:
            if self._store is None or self._active or time.monotonic() - self._last_use < idle_s:
                return False
            released = self._store.release()
            if released:
                self._releases += 1
                log.info("released %d idle collection(s) of the store", released)
            return bool(released)

    def start_idle_release(self, idle_s: float) -> None:
        """Start a daemon thread that calls :meth:`release_if_idle` about every ``idle_s / 4`` seconds
        (0 or less: never release; the store stays held while the app lives)."""
        if idle_s <= 0 or self._releaser is not None:
            return

        def loop() -> None:
            while not self._stop.wait(max(0.05, min(1.0, idle_s / 4))):
                try:
                    self.release_if_idle(idle_s)
                except Exception:  # noqa: BLE001 - a failed release must not end the thread
                    log.exception("idle release failed")

        self._releaser = threading.Thread(target=loop, name="cbmir-idle-release", daemon=True)
        self._releaser.start()

    @property
    def releases(self) -> int:
        """How many idle releases freed something (for tests and the service's health answer)."""
        return self._releases

    def embedder(self, meta, *, weights: str | None = None):
        """The embedder that built a collection (its model, backend, weights kind, size, input size and 3D
        handling), built once per (collection configuration, weights) and cached.

        Args:
            meta: the collection's :class:`cbmir.search.schema.CollectionMeta`.
            weights: a local weights file or directory (default: the model's own source).

        Raises:
            CbmirError: the weights cannot be loaded here (names the model and ``--weights``); they are
                not the weights that built the collection (:func:`check_same_weights`).
        """
        key = (meta.model, meta.backend, meta.random_init, meta.size, meta.is_3d, meta.aggregation, meta.weights,
               weights, meta.input_size)
        with self._lock:
            emb = self._embedders.get(key)
            if emb is None:
                from cbmir.ingest.embedder import make_embedder
                from cbmir.ingest.extractors import create_extractor

                ext = create_extractor(meta.model, weights=weights, random_init=meta.random_init,
                                       device=self.settings.device, batch_size=self.settings.batch_size,
                                       backend=meta.backend if meta.backend != "numpy" else None,
                                       input_size=meta.input_size, precision=self.settings.precision)
                emb = make_embedder(ext, size=meta.size, is_3d=meta.is_3d,
                                    aggregation=meta.aggregation if meta.is_3d else "concat")
                check_same_weights(meta, emb)
                self._embedders[key] = emb
        return emb

    def collapse_warning(self, name: str, split: str = "train") -> str | None:
        """:func:`cbmir.search.diagnostics.collapse_warning` of a collection's split, computed once per
        (collection, split, point count) and cached (it reads a sample of stored vectors)."""
        from cbmir.search.diagnostics import collapse_warning

        key = (name, split, self.store.count(name, split))
        if key not in self._collapse:
            self._collapse[key] = collapse_warning(self.store, name, split)
        return self._collapse[key]

    def close(self) -> None:
        """Stop the idle-release thread and close the store (releases the embedded engine's locks)."""
        self._stop.set()
        if self._releaser is not None:
            self._releaser.join(timeout=5)
            self._releaser = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> "App":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
