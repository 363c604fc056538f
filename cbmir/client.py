"""A small programmatic search client.

    from cbmir.client import SearchClient
    client = SearchClient()                                   # CBMIR_* settings: embedded store or server
    hits = client.search_by_point("breastmnist_28_hog", index=0, split="test", k=5)
    for h in hits[0]:
        print(h.index, h.label, h.score)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbmir.search.schema import point_id
from cbmir.search.store import VectorStore, open_store


@dataclass
class Hit:
    """One retrieved database point: row ``index`` in ``split``, ``score`` (cosine similarity or
    Euclidean distance, as the collection), ``label`` and the full ``payload``."""

    index: int
    score: float
    label: int
    payload: dict


class SearchClient:
    """Exact top-k search by vector, by image or by stored point, over any collection.

    Args:
        store: an open :class:`cbmir.search.store.VectorStore`; default: from settings (``CBMIR_*``).
    """

    def __init__(self, store: VectorStore | None = None, settings=None) -> None:
        if store is None:
            from cbmir.core.settings import get_settings

            settings = settings or get_settings()
            store = open_store(settings)
        self.store = store
        self._extractors: dict = {}

    def collections(self) -> list[str]:
        """Names of all collections in the store."""
        return self.store.list_collections()

    def _hits(self, name: str, res, split: str) -> list[list[Hit]]:
        flat = np.unique(res.indices)
        _, pays = self.store.get_points(name, split, flat.tolist(), with_vectors=False)
        by_row = dict(zip(flat.tolist(), pays))
        return [[Hit(int(i), float(s), int(by_row[int(i)]["label"]), by_row[int(i)]) for i, s in zip(ri, rs)]
                for ri, rs in zip(res.indices, res.scores)]

    def search_by_vector(self, collection: str, vectors: np.ndarray, k: int = 5, *, split: str = "train",
                         exclude_ids=None) -> list[list[Hit]]:
        """Top-k database hits for float32 ``(Q, dim)`` or ``(dim,)`` query vectors (one list per query)."""
        res = self.store.search(collection, vectors, k, split=split, exclude_ids=exclude_ids)
        return self._hits(collection, res, split)

    def search_by_point(self, collection: str, index: int, *, split: str = "test", k: int = 5,
                        database_split: str = "train") -> list[list[Hit]]:
        """Top-k database hits for the stored point of row ``index`` of ``split``; the point itself is
        excluded by id (not by score) when it lies in the database split."""
        vec, _ = self.store.get_points(collection, split, [index])
        excl = [[point_id(split, index)]] if split == database_split else None
        return self.search_by_vector(collection, vec, k, split=database_split, exclude_ids=excl)

    def search_by_image(self, collection: str, images: np.ndarray, k: int = 5, *, weights: str | None = None,
                        device: str = "auto") -> list[list[Hit]]:
        """Embed in-memory images with the collection's own extractor, then search.

        Args:
            images: 2D collections: one image ``(H, W)`` / ``(H, W, C)`` or a batch ``(B, H, W, C)``,
                C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA), any numeric dtype and any size;
                3D collections: one volume ``(D, H, W)`` or a batch ``(B, D, H, W)``. Converted by the
                rules of :func:`cbmir.ingest.embedder.prepare_images` (uint8 kept, other dtypes min-max per
                image, alpha composited on black, resized to the collection's size, grey -> RGB).

        Returns:
            One list of :class:`Hit` per query image.

        Raises:
            CbmirError: a 2D image given to a 3D collection or a volume to a 2D one, NaN/inf pixels,
                or the collection's weights cannot be loaded here (``weights`` gives a local file).
        """
        from cbmir.ingest.embedder import make_embedder, prepare_images
        from cbmir.ingest.extractors import create_extractor

        meta = self.store.meta(collection)
        images = prepare_images(images, size=meta.size, is_3d=meta.is_3d)
        key = (collection, weights)
        if key not in self._extractors:
            ext = create_extractor(meta.model, weights=weights, random_init=meta.random_init, device=device,
                                   backend=meta.backend if meta.backend != "numpy" else None,
                                   input_size=meta.input_size)
            self._extractors[key] = make_embedder(ext, size=meta.size, is_3d=meta.is_3d,
                                                  aggregation=meta.aggregation if meta.is_3d else "concat")
        vecs = self._extractors[key].embed(images)
        return self.search_by_vector(collection, vecs, k)

    def close(self) -> None:
        self.store.close()
