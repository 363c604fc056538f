"""Qdrant server engine through ``qdrant-client`` (URL + API key), same interface as the embedded one.

Collection metadata (:class:`search.schema.CollectionMeta`) is kept in the collection's own
``metadata`` field. ``ServerStore(location=":memory:")`` or ``ServerStore(path=...)`` uses
qdrant-client's local mode, which speaks the same client API as a server; the tests use it to
exercise this code path without a server (local mode is ~0.5 s per query at 90k points, so it
is never the default).
"""

from __future__ import annotations

import json
import warnings
from typing import Iterator, Sequence

import numpy as np
from qdrant_client import QdrantClient, models

from ingest.base import CbmirError
from search.schema import CollectionMeta
from search.store import VectorStore, engine_distance

_DIST = {"cosine": models.Distance.COSINE, "dot": models.Distance.DOT, "euclidean": models.Distance.EUCLID}
_META_KEY = "cbmir"


def _split_filter(split: str | None):
    if split is None:
        return None
    return models.Filter(must=[models.FieldCondition(key="split", match=models.MatchValue(value=split))])


class ServerStore(VectorStore):
    """Collections in a Qdrant server (``url``, ``api_key``) or in qdrant-client local mode.

    Args:
        url: server URL, e.g. ``http://localhost:6333`` (``CBMIR_QDRANT_URL``); https for TLS.
        api_key: server API key (``CBMIR_QDRANT_API_KEY``); never logged.
        location / path: qdrant-client local mode (``":memory:"`` or a directory) instead of a server.
        timeout: request timeout in seconds.
    """

    engine = "qdrant-server"

    def __init__(self, url: str | None = None, api_key: str | None = None, *, location: str | None = None,
                 path: str | None = None, timeout: float = 60.0) -> None:
        if url:
            self.client = QdrantClient(url=url, api_key=api_key, timeout=int(timeout))
            self.engine = "qdrant-server"
        else:
            self.client = QdrantClient(location=location, path=path) if (location or path) else QdrantClient(":memory:")
            self.engine = "qdrant-client-local"
        self.url = url

    def _create(self, name: str, meta: CollectionMeta) -> None:
        dist = _DIST[engine_distance(meta)]
        self.client.create_collection(
            name,
            vectors_config={c: models.VectorParams(size=b - a, distance=dist) for c, a, b in meta.layout},
            metadata={_META_KEY: meta.to_json()},
        )
        if self.url:  # local mode has no payload indexes (and warns)
            self.client.create_payload_index(name, "split", models.PayloadSchemaType.KEYWORD)

    def read_meta(self, name: str) -> CollectionMeta | None:
        if not self.client.collection_exists(name):
            return None
        info = self.client.get_collection(name)
        md = getattr(info.config, "metadata", None) or {}
        if _META_KEY not in md:
            raise CbmirError(f"collection {name!r} exists on the server but was not made by cbmir "
                             "(no cbmir metadata); choose another collection or delete it")
        return CollectionMeta.from_dict(json.loads(md[_META_KEY]))

    def _upsert(self, name, ids, chunks, payloads) -> None:
        lists = {c: v.tolist() for c, v in chunks.items()}
        points = [models.PointStruct(id=pid, vector={c: lists[c][i] for c in lists}, payload=payloads[i])
                  for i, pid in enumerate(ids)]
        self.client.upsert(name, points=points, wait=True)

    def _query(self, name, vector_name, queries, limit, split):
        flt = _split_filter(split)
        params = models.SearchParams(exact=True)
        reqs = [models.QueryRequest(query=row.tolist(), using=vector_name, limit=int(limit), filter=flt,
                                    params=params, with_payload=False, with_vector=False) for row in queries]
        with warnings.catch_warnings():  # local mode: "search_params has no effect" (it is always exact)
            warnings.simplefilter("ignore", UserWarning)
            out = self.client.query_batch_points(name, requests=reqs)
        return [[(int(p.id), float(p.score)) for p in r.points] for r in out]

    def _scroll(self, name, split, with_vectors, batch=1024) -> Iterator:
        offset = None
        while True:
            recs, offset = self.client.scroll(name, scroll_filter=_split_filter(split), limit=batch, offset=offset,
                                              with_payload=True, with_vectors=with_vectors)
            if recs:
                chunks = None
                if with_vectors:
                    chunks = {c: np.asarray([r.vector[c] for r in recs], dtype=np.float32) for c in recs[0].vector}
                yield [int(r.id) for r in recs], chunks, [dict(r.payload or {}) for r in recs]
            if offset is None:
                break

    def _retrieve(self, name, ids, with_vectors):
        recs = self.client.retrieve(name, ids=[int(i) for i in ids], with_payload=True, with_vectors=with_vectors)
        return [(int(r.id), ({c: np.asarray(v, dtype=np.float32) for c, v in r.vector.items()}
                             if with_vectors else None), dict(r.payload or {})) for r in recs]

    def count(self, name: str, split: str | None = None) -> int:
        self.meta(name)
        return int(self.client.count(name, count_filter=_split_filter(split), exact=True).count)

    def delete_points(self, name: str, ids: Sequence[int]) -> None:
        self.client.delete(name, points_selector=models.PointIdsList(points=[int(i) for i in ids]), wait=True)

    def delete_collection(self, name: str) -> None:
        if self.client.collection_exists(name):
            self.client.delete_collection(name)

    def list_collections(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections)

    def close(self) -> None:
        self.client.close()
