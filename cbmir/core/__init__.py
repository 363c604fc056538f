"""The bottom layer every cbmir package may import: errors, split codes, settings, shared protocols,
atomic file writes and file locks. It imports nothing of cbmir above it and no heavy library.

Layers, each importing only those below it (DESIGN.md §8)::

    cli / client / grid / service / benchmarks   (entry points)
    app                             (the application layer: one function per use case)
    evaluation   ingest             (metrics, reports / sources, extractors, jobs)
    search                          (vector store, engines, exact top-k)
    core                            (this package)
"""

from cbmir.core.errors import CbmirError
from cbmir.core.splits import SPLIT_CODES, SPLITS

__all__ = ["SPLITS", "SPLIT_CODES", "CbmirError"]
