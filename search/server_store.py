"""Qdrant server engine through ``qdrant-client`` (URL + API key), same interface as the embedded one.

Collection metadata (:class:`cbmir.search.schema.CollectionMeta`) is kept in the collection's own
``metadata`` field. ``ServerStore(location=":memory:")`` or ``ServerStore(path=...)`` uses
qdrant-client's local mode, which speaks the same client API as a server; the tests use it to
exercise this code path without a server (local mode is ~0.5 s per query at 90k points, so it
is never the default).

**Faults.** Every client call goes through :meth:`ServerStore._call`, which retries transient
failures — connection refused / reset, timeouts (``httpx.TransportError``, wrapped by qdrant-client
in ``ResponseHandlingException``), HTTP 408, 429 (honouring ``Retry-After``), 500, 502, 503 and
504 — with exponential backoff (``retry_base_s`` doubling up to ``retry_max_delay_s``, ±25 %
jitter) for at most ``retry_total_s`` seconds per call, then raises one
:class:`~cbmir.core.errors.CbmirError` naming the server, the operation, the attempts and the last
error. HTTP 401 / 403 are not retried: the message says the API key is missing or wrong (the key
itself is never printed). Any other HTTP error becomes a :class:`~cbmir.core.errors.CbmirError` with the
server's answer. Re-sending is safe: upserts use deterministic point ids
(:func:`cbmir.search.schema.point_id`), so a batch whose first attempt did reach the server overwrites
itself; a collection creation answered 409 after a lost reply counts as done.

**Cluster.** :class:`cbmir.search.cluster.ClusterConfig` (``cluster=``) sets the shards, replicas and
write consistency of the collections created, the read consistency of every read, and gRPC
(``prefer_grpc``) instead of REST; each collection gets payload indexes on ``split`` (keyword) and
``label`` (integer), and its search mode's HNSW / quantization settings
(:func:`cbmir.search.cluster.collection_params`).
Several processes may upsert into one collection at once (sharded ingest writes directly).
"""

from __future__ import annotations

import random
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

try:
    from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
except ImportError:  # pragma: no cover - older qdrant-client
    ResourceExhaustedResponse = None  # type: ignore[assignment]

from cbmir.core.errors import CbmirError, StoreUnavailableError
from cbmir.search.cluster import ClusterConfig, collection_params, search_params
from cbmir.search.filters import Selection, as_selection
from cbmir.search.schema import CollectionMeta, parse_meta
from cbmir.search.store import VectorStore, engine_distance

_DIST = {"cosine": models.Distance.COSINE, "dot": models.Distance.DOT, "euclidean": models.Distance.EUCLID}
_META_KEY = "cbmir"
#: HTTP statuses retried with backoff (the server is busy, restarting or behind a failing proxy).
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def _transient(exc: BaseException) -> tuple[bool, float | None, str]:
    """Classify a client error: ``(retry?, server-suggested delay in s or None, short description)``."""
    if ResourceExhaustedResponse is not None and isinstance(exc, ResourceExhaustedResponse):
        try:
            after = float(getattr(exc, "retry_after_s", None))
        except (TypeError, ValueError):  # absent, or an HTTP date: use our own backoff
            after = None
        return True, after, "HTTP 429 (rate limited)"
    if isinstance(exc, UnexpectedResponse):
        code = exc.status_code
        return code in RETRY_STATUSES, None, f"HTTP {code} {exc.reason_phrase}".strip()
    src = exc.source if isinstance(exc, ResponseHandlingException) else exc
    if isinstance(src, (httpx.TransportError, ConnectionError, TimeoutError)):
        return True, None, f"{type(src).__name__}: {src}"
    return False, None, f"{type(src).__name__}: {src}"


def _split_filter(where: str | Selection | None):
    """qdrant-client filter of a split name or a :class:`~cbmir.search.filters.Selection` (None: no filter)."""
    sel = as_selection(where)
    if sel is None:
        return None
    conds = [models.FieldCondition(key="split", match=models.MatchValue(value=sel.split))]
    for field, values in sel.match:
        match = (models.MatchValue(value=values[0]) if len(values) == 1
                 else models.MatchAny(any=list(values)))
        conds.append(models.FieldCondition(key=field, match=match))
    return models.Filter(must=conds)


class ServerStore(VectorStore):
    """Collections in a Qdrant server (``url``, ``api_key``) or in qdrant-client local mode.

    Args:
        url: server URL, e.g. ``http://localhost:6333`` (``CBMIR_QDRANT_URL``); https for TLS.
        api_key: server API key (``CBMIR_QDRANT_API_KEY``); never logged.
        location / path: qdrant-client local mode (``":memory:"`` or a directory) instead of a server.
        timeout: request timeout in seconds (one attempt).
        retry_total_s: longest time, in seconds, spent retrying one call before giving up
            (``CBMIR_QDRANT_RETRY_S``); 0 disables retries.
        retry_base_s, retry_max_delay_s: first backoff delay and its cap, in seconds.
        cluster: :class:`~cbmir.search.cluster.ClusterConfig` (shards, replicas, consistency, gRPC); default: the
            server's defaults over REST.

    Raises:
        CbmirError: from any method, when the server stays unreachable, refuses the API key or
            answers an error (see the module docstring).
    """

    engine = "qdrant-server"
    #: A Qdrant server refuses POST bodies above ``service.max_request_size_mb`` (32 MB by default);
    #: qdrant-client sends JSON, ~21 bytes per float32 value, so at most 512 Ki values (~11 MB) go in
    #: one upsert or query batch (e.g. one 518,400-dim 64³ HOG volume, or 8 queries of a 64,800-dim chunk).
    max_values_per_call = 1 << 19

    def __init__(self, url: str | None = None, api_key: str | None = None, *, location: str | None = None,
                 path: str | None = None, timeout: float = 60.0, retry_total_s: float = 120.0,
                 retry_base_s: float = 0.5, retry_max_delay_s: float = 15.0,
                 cluster: ClusterConfig | None = None) -> None:
        self.cluster = cluster or ClusterConfig()
        if url:
            # check_compatibility=False: no blocking, unretried version request at construction
            self.client = QdrantClient(url=url, api_key=api_key, timeout=max(1, int(round(timeout))),
                                       prefer_grpc=self.cluster.prefer_grpc, grpc_port=self.cluster.grpc_port,
                                       check_compatibility=False)
            self.engine = "qdrant-server"
        else:
            self.client = QdrantClient(location=location, path=path) if (location or path) else QdrantClient(":memory:")
            self.engine = "qdrant-client-local"
        self.url = url
        self.retry_total_s = float(retry_total_s)
        self.retry_base_s = float(retry_base_s)
        self.retry_max_delay_s = float(retry_max_delay_s)
        self.retries = 0  # transient failures retried so far (for reports and tests)
        self._answered = False  # has the server answered once? (a refused first connect fails fast)

    def __repr__(self) -> str:  # never shows the API key
        return f"ServerStore(engine={self.engine!r}, url={self.url!r}, transport={self.transport!r})"

    @property
    def transport(self) -> str:
        """``grpc`` or ``rest`` for a server (``prefer_grpc``), ``local`` for qdrant-client local mode."""
        if not self.url:
            return "local"
        return "grpc" if self.cluster.prefer_grpc else "rest"

    def _where(self) -> str:
        return f"Qdrant server {self.url}" if self.url else "qdrant-client local store"

    def _call(self, op: str, fn: Callable[..., Any], *args, ok_conflict: bool = False, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` with retries of transient failures (module docstring).

        Args:
            op: what the call does, for messages (``upsert into 'x'``).
            ok_conflict: an HTTP 409 answer after a failed attempt means the first attempt did
                succeed (collection creation): return None.

        Raises:
            CbmirError: retries exhausted (names the server, ``op``, attempts, seconds, last error),
                HTTP 401/403 (API key), any other HTTP error or a malformed answer.
        """
        t0 = time.monotonic()
        attempt = 0
        while True:
            try:
                out = fn(*args, **kwargs)
                self._answered = True
                return out
            except CbmirError:
                raise
            except Exception as exc:  # classified below; unknown errors propagate unchanged
                if not isinstance(exc, (UnexpectedResponse, ResponseHandlingException, httpx.HTTPError,
                                        ConnectionError, TimeoutError)) and not (
                        ResourceExhaustedResponse is not None and isinstance(exc, ResourceExhaustedResponse)):
                    raise
                retry, suggested, what = _transient(exc)
                code = getattr(exc, "status_code", None)
                if code in (401, 403):
                    raise StoreUnavailableError(
                        f"{self._where()} answered HTTP {code} ({'Unauthorized' if code == 401 else 'Forbidden'}) "
                        f"to '{op}': the API key is missing or wrong (set CBMIR_QDRANT_API_KEY, or "
                        "qdrant_api_key in .env; the key is never printed)") from None
                if code == 409 and ok_conflict and attempt > 0:
                    return None
                if not retry:
                    detail = ""
                    if isinstance(exc, UnexpectedResponse):
                        detail = ": " + exc.content[:300].decode("utf-8", "replace").strip()
                    raise CbmirError(f"{self._where()} failed '{op}': {what}{detail}") from None
                elapsed = time.monotonic() - t0
                src = exc.source if isinstance(exc, ResponseHandlingException) else exc
                if (self.url and not self._answered and attempt >= 1
                        and isinstance(src, (httpx.ConnectError, ConnectionRefusedError))):
                    # never reached: no server there (a wrong URL or a server not started); two quick
                    # tries, not the whole retry budget (which is for a server that drops mid-run)
                    raise StoreUnavailableError(
                        f"{self._where()} is unreachable: '{op}' failed {attempt + 1} time(s) ({what}). Start the "
                        "server (`docker compose up -d`), fix --qdrant-url / CBMIR_QDRANT_URL, or drop "
                        "--qdrant-url to use the embedded store.") from None
                delay = suggested if suggested is not None else min(
                    self.retry_max_delay_s, self.retry_base_s * (2 ** attempt)) * random.uniform(0.75, 1.25)
                if elapsed + delay > self.retry_total_s:
                    raise StoreUnavailableError(
                        f"{self._where()} is unreachable or failing: '{op}' did not succeed after "
                        f"{attempt + 1} attempt(s) over {elapsed:.1f} s (retry budget {self.retry_total_s:g} s, "
                        f"CBMIR_QDRANT_RETRY_S); last error: {what}. Check that the server is running and that "
                        "CBMIR_QDRANT_URL / --qdrant-url is right. Points already stored are kept; re-running "
                        "the same command resumes (re-sent points overwrite themselves).") from None
                attempt += 1
                self.retries += 1
                time.sleep(delay)

    def _create(self, name: str, meta: CollectionMeta) -> None:
        dist = _DIST[engine_distance(meta)]
        self._call(
            f"create collection {name!r}", self.client.create_collection,
            name,
            vectors_config={c: models.VectorParams(size=b - a, distance=dist) for c, a, b in meta.layout},
            metadata={_META_KEY: meta.to_json()}, ok_conflict=True,
            **self.cluster.creation_params(), **collection_params(meta.index_config()),
        )
        if self.url:  # local mode has no payload indexes (and warns)
            for field, schema in (("split", models.PayloadSchemaType.KEYWORD),
                                  ("label", models.PayloadSchemaType.INTEGER)):
                self._call(f"create the {field} index of {name!r}", self.client.create_payload_index,
                           name, field, schema)

    def read_meta(self, name: str) -> CollectionMeta | None:
        if not self._call(f"check collection {name!r}", self.client.collection_exists, name):
            return None
        info = self._call(f"read collection {name!r}", self.client.get_collection, name)
        md = getattr(info.config, "metadata", None) or {}
        if _META_KEY not in md:
            raise CbmirError(f"collection {name!r} exists on the server but was not made by cbmir "
                             "(no cbmir metadata); choose another collection or delete it")
        return parse_meta(md[_META_KEY], name, f"on the {self._where()}")  # damaged: DamagedMetaError

    def write_meta(self, name: str, meta: CollectionMeta) -> None:
        self._call(f"update the metadata of {name!r}", self.client.update_collection, name,
                   metadata={_META_KEY: meta.to_json()})

    def _upsert(self, name, ids, chunks, payloads) -> None:
        lists = {c: v.tolist() for c, v in chunks.items()}

        def send():  # fresh point objects per attempt: a client may normalise vectors in place
            points = [models.PointStruct(id=pid, vector={c: list(lists[c][i]) for c in lists}, payload=payloads[i])
                      for i, pid in enumerate(ids)]
            return self.client.upsert(name, points=points, wait=True)

        self._call(f"upsert of {len(ids)} points into {name!r}", send)

    def _query(self, name, vector_name, queries, limit, split, mode=None):
        flt = _split_filter(split)
        params = search_params(mode)
        reqs = [models.QueryRequest(query=row.tolist(), using=vector_name, limit=int(limit), filter=flt,
                                    params=params, with_payload=False, with_vector=False) for row in queries]
        with warnings.catch_warnings():  # local mode: "search_params has no effect" (it is always exact)
            warnings.simplefilter("ignore", UserWarning)
            out = self._call(f"query {name!r}", self.client.query_batch_points, name, requests=reqs,
                             consistency=self.cluster.consistency())
        return [[(int(p.id), float(p.score)) for p in r.points] for r in out]

    def _scroll(self, name, split, with_vectors, batch=1024) -> Iterator:
        offset = None
        while True:
            recs, offset = self._call(f"scroll {name!r}", self.client.scroll, name,
                                      scroll_filter=_split_filter(split), limit=batch, offset=offset,
                                      with_payload=True, with_vectors=with_vectors,
                                      consistency=self.cluster.consistency())
            if recs:
                chunks = None
                if with_vectors:
                    chunks = {c: np.asarray([r.vector[c] for r in recs], dtype=np.float32) for c in recs[0].vector}
                yield [int(r.id) for r in recs], chunks, [dict(r.payload or {}) for r in recs]
            if offset is None:
                break

    def _retrieve(self, name, ids, with_vectors):
        recs = self._call(f"retrieve points of {name!r}", self.client.retrieve, name, ids=[int(i) for i in ids],
                          with_payload=True, with_vectors=with_vectors, consistency=self.cluster.consistency())
        return [(int(r.id), ({c: np.asarray(v, dtype=np.float32) for c, v in r.vector.items()}
                             if with_vectors else None), dict(r.payload or {})) for r in recs]

    def count(self, name: str, split: str | None = None) -> int:
        self.meta(name)
        return int(self._call(f"count {name!r}", self.client.count, name, count_filter=_split_filter(split),
                              exact=True).count)

    def delete_points(self, name: str, ids: Sequence[int]) -> None:
        self._call(f"delete points of {name!r}", self.client.delete, name,
                   points_selector=models.PointIdsList(points=[int(i) for i in ids]), wait=True)

    def _overwrite_payload(self, name, pairs) -> None:
        ops = [models.OverwritePayloadOperation(overwrite_payload=models.SetPayload(
            payload=payload, points=[int(pid)])) for pid, payload in pairs]
        self._call(f"update payloads of {name!r}", self.client.batch_update_points, name, update_operations=ops,
                   wait=True)

    def delete_collection(self, name: str) -> None:
        if self._call(f"check collection {name!r}", self.client.collection_exists, name):
            self._call(f"delete collection {name!r}", self.client.delete_collection, name)

    def list_collections(self) -> list[str]:
        return sorted(c.name for c in self._call("list collections", self.client.get_collections).collections)

    def close(self) -> None:
        self.client.close()
