"""The application layer: the one place where datasets, extractors, the store, ingest, evaluation and search
are wired together. The CLI, the benchmark grid, :class:`cbmir.client.SearchClient` and the HTTP service call
these functions and hold no wiring of their own, so one request gives one answer everywhere.

Modules: :mod:`~cbmir.app.context` (settings, store, embedders), :mod:`~cbmir.app.collections` (which
collection a request means), :mod:`~cbmir.app.ingesting`, :mod:`~cbmir.app.evaluating`,
:mod:`~cbmir.app.searching`, :mod:`~cbmir.app.items` (add / delete single points of an archive collection),
:mod:`~cbmir.app.manage` (list, describe, delete, snapshot and restore collections).
"""

from cbmir.app.collections import ArchiveOptions, CollectionRef, collection_info, open_collection, resolve_name
from cbmir.app.context import App, load_settings
from cbmir.app.searching import FileOptions, Hit, QueryInfo, SearchRequest, SearchResponse, search

__all__ = ["App", "ArchiveOptions", "CollectionRef", "FileOptions", "Hit", "QueryInfo", "SearchRequest",
           "SearchResponse", "collection_info", "load_settings", "open_collection", "resolve_name", "search"]
