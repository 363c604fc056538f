"""Shared protocols: what the layers above exchange without importing each other."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """Prepared images -> one float32 vector each (what the ingest job, the search layer's
    search-by-image and the service need of an extractor, cf. :mod:`cbmir.ingest.embedder`).

    ``embed`` takes uint8 ``(B, size, size, 3)`` images (2D collections) or ``(B, size, size, size)``
    volumes (3D collections) and returns float32 ``(B, dim)``. ``identity()`` is the JSON-serialisable
    description recorded in the collection metadata (model, weights, preprocessing, dim).
    """

    dim: int

    def embed(self, images: np.ndarray) -> np.ndarray: ...

    def identity(self) -> dict: ...
