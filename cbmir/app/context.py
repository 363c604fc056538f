"""The application context: settings, one open store and the embedders built for it.

Every entry point (CLI command, benchmark grid, :class:`cbmir.client.SearchClient`, HTTP service) holds
one :class:`App` and calls the functions of :mod:`cbmir.app` with it, so one request gives one answer
everywhere.
"""

from __future__ import annotations

import threading
from pathlib import Path

from cbmir.core.errors import CbmirError
from cbmir.core.settings import Settings, get_settings

#: settings field -> its CLI option, for messages about invalid values
SETTING_OPTIONS = {"distance": "--distance", "batch_size": "--batch-size", "data_dir": "--data-dir",
                   "store_path": "--store-path", "qdrant_url": "--qdrant-url", "device": "--device",
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
        valid = f"must be an integer >= {ctx['ge']}"
    elif "gt" in ctx:
        valid = f"must be > {ctx['gt']}"
    else:
        valid = e.get("msg", "invalid")
    return f"invalid {where} value {e.get('input')!r}: {valid}"


class App:
    """Settings, the store they name (opened on first use) and a cache of embedders.

    Args:
        settings: default :func:`load_settings` ``()``.
        store: an open :class:`cbmir.search.store.VectorStore` to use instead of opening one.

    Use as a context manager, or call :meth:`close`. Thread-safe for concurrent searches (the service):
    the store is opened once, and each embedder is built once under a lock.
    """

    def __init__(self, settings: Settings | None = None, store=None) -> None:
        self.settings = settings or load_settings()
        self._store = store
        self._embedders: dict[tuple, object] = {}
        self._lock = threading.Lock()

    @property
    def store(self):
        """The open vector store (embedded Qdrant Edge, or a Qdrant server when ``qdrant_url`` is set)."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    from cbmir.search.store import open_store

                    self._store = open_store(self.settings)
        return self._store

    def embedder(self, meta, *, weights: str | None = None):
        """The embedder that built a collection (its model, backend, weights kind, size and 3D handling),
        built once per (collection configuration, weights) and cached.

        Args:
            meta: the collection's :class:`cbmir.search.schema.CollectionMeta`.
            weights: a local weights file or directory (default: the model's own source).

        Raises:
            CbmirError: the weights cannot be loaded here (names the model and ``--weights``).
        """
        key = (meta.model, meta.backend, meta.random_init, meta.size, meta.is_3d, meta.aggregation, meta.weights,
               weights)
        with self._lock:
            emb = self._embedders.get(key)
            if emb is None:
                from cbmir.ingest.embedder import make_embedder
                from cbmir.ingest.extractors import create_extractor

                ext = create_extractor(meta.model, weights=weights, random_init=meta.random_init,
                                       device=self.settings.device, batch_size=self.settings.batch_size,
                                       backend=meta.backend if meta.backend != "numpy" else None)
                emb = make_embedder(ext, size=meta.size, is_3d=meta.is_3d,
                                    aggregation=meta.aggregation if meta.is_3d else "concat")
                self._embedders[key] = emb
        return emb

    def close(self) -> None:
        """Close the store (releases the embedded engine's locks)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> "App":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
