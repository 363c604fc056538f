"""A programmatic search client over the application layer (the same answers as ``cbmir search``).

    from cbmir.client import SearchClient
    client = SearchClient()                                   # CBMIR_* settings: embedded store or server
    for hit in client.search_by_point("breastmnist_28_hog", index=0, split="test", k=5)[0]:
        print(hit.rank, hit.index, hit.class_name, hit.score)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from cbmir.app import App, FileOptions, Hit, SearchRequest, SearchResponse, collection_info, search

__all__ = ["Hit", "SearchClient"]


class SearchClient:
    """Exact top-k search by vector, by image (array or file), or by stored point, over any collection.

    Every method builds a :class:`cbmir.app.SearchRequest` and calls :func:`cbmir.app.search`, so the rules
    (exclude-self, the range of k, accepted image layouts, filters, distance checks) are those of the CLI
    and the HTTP service. Errors are :class:`cbmir.core.errors.CbmirError` with a message naming the input.

    Args:
        store: an open :class:`cbmir.search.store.VectorStore` (default: from settings, ``CBMIR_*``).
        settings: :class:`cbmir.core.settings.Settings` (default: from the environment).
    """

    def __init__(self, store=None, settings=None) -> None:
        self.app = App(settings, store=store)

    @property
    def store(self):
        return self.app.store

    def collections(self) -> list[str]:
        """Names of all collections in the store."""
        return self.store.list_collections()

    def info(self, collection: str) -> dict:
        """Dataset, model, dim, distance, point counts per split, class names of ``collection``."""
        return collection_info(self.store, collection)

    def search(self, request: SearchRequest) -> SearchResponse:
        """Answer a full :class:`~cbmir.app.SearchRequest` (queries, hits, notes)."""
        return search(self.app, request)

    def search_by_vector(self, collection: str, vectors, k: int = 5, *, database_split: str = "train",
                         filter: Mapping[str, Any] | None = None) -> list[list[Hit]]:
        """Top-k database hits for float32 ``(Q, dim)`` or ``(dim,)`` query vectors (one list per query)."""
        return self.search(SearchRequest(collection, vectors=vectors, k=k, database_split=database_split,
                                         filter=filter)).hits

    def search_by_point(self, collection: str, index: int | Sequence[int], *, split: str = "test", k: int = 5,
                        database_split: str = "train", exclude_self: bool | None = None,
                        filter: Mapping[str, Any] | None = None) -> list[list[Hit]]:
        """Top-k database hits for the stored point(s) of row(s) ``index`` of ``split``; a query point that
        lies in the database is left out of its own results (by id) unless ``exclude_self=False``."""
        rows = [index] if np.isscalar(index) else list(index)
        return self.search(SearchRequest(collection, points=[(split, i) for i in rows], k=k,
                                         database_split=database_split, exclude_self=exclude_self,
                                         filter=filter)).hits

    def search_by_image(self, collection: str, images, k: int = 5, *, database_split: str = "train",
                        filter: Mapping[str, Any] | None = None, weights: str | None = None,
                        file_options: FileOptions | None = None) -> list[list[Hit]]:
        """Embed images with the collection's own extractor, then search.

        Args:
            images: an array (2D collections: ``(H, W)``, ``(H, W, C)``, ``(B, H, W, C)`` or a grey batch
                ``(B, H, W)``; 3D: ``(D, H, W)`` or ``(B, D, H, W)``; any numeric dtype), or a file path, or
                a list of file paths (read with the ingest pixel rules, ``file_options``).
            weights: a local weights file or directory (default: the model's own source).

        Returns:
            One list of :class:`~cbmir.app.Hit` per query image.
        """
        opts = file_options or FileOptions()
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        if isinstance(images, (list, tuple)) and images and all(isinstance(x, (str, os.PathLike)) for x in images):
            req = SearchRequest(collection, files=list(images), k=k, database_split=database_split, filter=filter,
                                weights=weights, file_options=opts)
        else:
            req = SearchRequest(collection, images=images, k=k, database_split=database_split, filter=filter,
                                weights=weights, file_options=opts)
        return self.search(req).hits

    def add(self, collection: str, files: str | os.PathLike | Sequence[str | os.PathLike], *,
            label: int | str | None = None, split: str | None = None, meta: Mapping[str, Any] | None = None,
            weights: str | None = None):
        """Embed and add image / volume files to a user-archive collection (``cbmir add``; rules of
        :mod:`cbmir.app.items`). Returns :class:`cbmir.app.items.AddResult` (point ids, status, images embedded)."""
        from cbmir.app.items import NewPoint, add_points

        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        return add_points(self.app, collection, [NewPoint(file=f, label=label, split=split, meta=dict(meta or {}))
                                                 for f in files], weights=weights)

    def delete(self, collection: str, *, point_ids: Sequence[int] = (), paths: Sequence[str] = ()):
        """Delete points by id and/or file path (``cbmir delete``). Returns
        :class:`cbmir.app.items.DeleteResult`."""
        from cbmir.app.items import delete_points

        return delete_points(self.app, collection, point_ids=point_ids, paths=paths)

    def close(self) -> None:
        self.app.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
