"""The vector store interface: one collection per (dataset, size, model), exact top-k search.

:class:`VectorStore` holds the engine-independent logic — metadata checks, the chunked vector
layout for vectors above Qdrant's 65,535-dim limit, exact top-k with deterministic ties — and
delegates a handful of primitives to an engine:

* :class:`cbmir.search.edge_store.EdgeStore` — Qdrant Edge, the Qdrant engine in-process (default);
* :class:`cbmir.search.server_store.ServerStore` — a Qdrant server through qdrant-client (also
  qdrant-client's local mode, which speaks the same client API and stands in for a server in tests).

Both answer every query with ``exact=True`` (never HNSW), so rankings equal brute force — except a
search of a collection created in an approximate mode (:mod:`cbmir.search.index_config`: HNSW and/or
quantization), which uses that mode unless the caller asks for exact search (``search(..., exact=True)``:
what the study's protocol, :func:`cbmir.evaluation.evaluate.evaluate_collection`, always does).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from cbmir.core.errors import CbmirError, NotFoundError
from cbmir.search.filters import Selection
from cbmir.search.index_config import IndexConfig
from cbmir.search.schema import CollectionMeta, point_id, split_and_index

#: Extra candidates fetched beyond k so that similarity ties at rank k are resolved exactly.
TIE_MARGIN = 8
#: Default for :attr:`VectorStore.max_values_per_call`: most vector values (points x dims, or
#: queries x chunk dims) sent or fetched in one engine call. Engines exchange vectors as Python lists
#: (~32 bytes per value in memory), so 8 Mi values keep a 64³ volume collection (HOG 518,400 dims,
#: ResNet50 131,072 dims) at 16 / 64 points per call instead of gigabytes of Python floats.
MAX_VALUES_PER_CALL = 1 << 23


#: Unit roundoff of float32 (engines score in float32).
_U32 = 2.0 ** -24
#: Most vector values :meth:`VectorStore._exact_rerank` keeps cached per store (1 GiB as float32).
RERANK_CACHE_VALUES = 1 << 28


def score_error_bound(dim: int, n_chunks: int = 1) -> float:
    """Bound on ``|engine score - exact score|`` of one pair, relative to the vectors' scale.

    A length-``d`` float32 dot product differs from the exact one by at most
    ``gamma_d * sum|x_i y_i|`` with ``gamma_d = d u / (1 - d u)``, ``u = 2**-24`` (classic worst-case
    rounding bound, any summation order). Each chunk is a separate dot product, so for chunks of at
    most ``dim`` values the summed error is at most ``gamma_dim * sum over all i of |x_i y_i|``, and for
    unit vectors ``sum|x_i y_i| <= 1``. ``n_chunks + 4`` more ``u`` cover the rounding of each chunk
    score to float32, of their sum and of the engine's own re-normalisation. For Euclidean distances
    the same bound applies to squared distances relative to ``(|q| + |x|)^2``.

    Args:
        dim: length of the longest chunk (``max(stop - start)`` over the layout).
        n_chunks: number of chunks.
    """
    du = int(dim) * _U32
    return du / (1.0 - du) + (int(n_chunks) + 4) * _U32


def rows_per_call(dim: int, budget: int = MAX_VALUES_PER_CALL) -> int:
    """Rows (points or queries) of ``dim`` values per engine call: ``budget // dim``, clipped to 1..1024."""
    return max(1, min(1024, int(budget) // max(1, int(dim))))


@dataclass
class SearchResult:
    """Top-k results of a batch of queries, rank order.

    Attributes:
        ids: uint64-valued int64 ``(Q, k)`` point ids.
        indices: int64 ``(Q, k)`` database row index of each hit (row in its split).
        scores: float32 ``(Q, k)``: cosine similarity (higher is closer) or Euclidean distance
            (lower is closer), as the collection's ``distance``.
    """

    ids: np.ndarray
    indices: np.ndarray
    scores: np.ndarray


def _as_matrix(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf: refused below
        x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise CbmirError(f"{what} must have shape (n, {dim}); got {tuple(np.shape(x))}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise CbmirError(f"{what} contains NaN/inf (or values beyond float32's ±3.4e38) in rows {bad[:10].tolist()}; "
                         "refusing to store or search it")
    return np.ascontiguousarray(x)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.where(n > 0, n, 1.0)).astype(np.float32)


class VectorStore(ABC):
    """Collections of embeddings with payload, and exact top-k search over one split.

    Engines implement the ``_``-prefixed primitives; everything else is shared, so every engine
    returns the same results for the same vectors.
    """

    engine: str = "abstract"
    #: Most vector values per engine call (upsert, query batch, scroll page); see
    #: :data:`MAX_VALUES_PER_CALL`. A Qdrant server lowers it to stay under its request-size limit.
    max_values_per_call: int = MAX_VALUES_PER_CALL
    #: Re-score near-ties in float64 (:meth:`_exact_rerank`): ``"auto"`` = for 3D collections and chunked
    #: layouts (rankings then equal a float64 brute force exactly); ``True`` = always; ``False`` = never
    #: (rankings equal brute force up to float32 rounding of near-tied scores).
    exact_rerank: bool | str = "auto"
    #: Can several processes write one collection at the same time? (a Qdrant server: yes; the embedded
    #: engine: no, one process per shard — sharded ingest then stages each share, :mod:`cbmir.ingest.shards`)
    concurrent_writers: bool = True

    # ---------------------------------------------------------------- engine primitives
    @abstractmethod
    def _create(self, name: str, meta: CollectionMeta) -> None:
        """Create collection ``name`` with one named dense vector per layout chunk and store ``meta``."""

    @abstractmethod
    def read_meta(self, name: str) -> CollectionMeta | None:
        """Metadata of collection ``name``, or None when it does not exist."""

    @abstractmethod
    def write_meta(self, name: str, meta: CollectionMeta) -> None:
        """Replace the stored metadata of the existing collection ``name`` (atomically)."""

    @abstractmethod
    def _upsert(self, name: str, ids: list[int], chunks: dict[str, np.ndarray], payloads: list[dict]) -> None:
        """Upsert points: ``chunks`` maps vector name -> float32 ``(B, chunk_dim)``."""

    @abstractmethod
    def _query(self, name: str, vector_name: str, queries: np.ndarray, limit: int,
               split: str | Selection | None, mode: IndexConfig | None = None) -> list[list[tuple[int, float]]]:
        """Nearest neighbours of each query row within ``split``: ``[(id, score), ...]`` per query.

        ``mode`` None: exact (every point scored on its float32 vector, quantization ignored); else the
        collection's approximate mode (HNSW with ``mode.ef``, quantized scoring with its rescoring).
        """

    @abstractmethod
    def _scroll(self, name: str, split: str | Selection | None, with_vectors: bool,
                batch: int = 1024) -> Iterator[tuple[list[int], dict[str, np.ndarray] | None, list[dict]]]:
        """Iterate over points of ``split``: ``(ids, chunk vectors or None, payloads)`` per page."""

    @abstractmethod
    def _retrieve(self, name: str, ids: Sequence[int],
                  with_vectors: bool) -> list[tuple[int, dict[str, np.ndarray] | None, dict]]:
        """Points by id (missing ids are absent from the result)."""

    @abstractmethod
    def count(self, name: str, split: str | Selection | None = None) -> int:
        """Number of points in collection ``name`` (in ``split`` when given)."""

    @abstractmethod
    def delete_points(self, name: str, ids: Sequence[int]) -> None:
        """Delete points by id."""

    @abstractmethod
    def _overwrite_payload(self, name: str, pairs: Sequence[tuple[int, dict]]) -> None:
        """Replace the whole payload of existing points: ``[(id, payload), ...]`` (vectors untouched)."""

    @abstractmethod
    def delete_collection(self, name: str) -> None:
        """Delete collection ``name`` and all its points (no error when absent)."""

    @abstractmethod
    def list_collections(self) -> list[str]:
        """Names of all collections."""

    def build_index(self, name: str) -> bool:
        """Build the approximate index / quantized vectors of an approximate collection now (blocking) where the
        engine does not do it by itself; True when something was built. Default: nothing to do (a Qdrant
        server optimizes in the background)."""
        return False

    def lock(self, name: str) -> None:
        """Take collection ``name`` for this process until :meth:`release_collection` / :meth:`close` (the embedded
        engine: its advisory lock, waiting up to ``lock_wait_s`` for another process). Default: nothing to take."""

    def release_collection(self, name: str) -> None:
        """Stop using collection ``name`` in this store (the embedded engine closes its shard and lets another
        process open it); it is reopened on next use. Default: nothing to release."""

    def copy_points(self, src: str, dst: str) -> int:
        """Upsert every point of ``src`` (vectors as stored, payloads) into ``dst``, page by page; returns the
        number of points copied. Idempotent (same point ids), so an interrupted copy is redone by copying again."""
        meta = self.meta(src)
        n = 0
        for ids, chunks, payloads in self._scroll(src, None, True,
                                                  batch=rows_per_call(meta.dim, self.max_values_per_call)):
            self._upsert(dst, ids, chunks, payloads)
            n += len(ids)
        flush = getattr(self, "flush", None)
        if flush:
            flush(dst)
        self._rerank_cache = None
        return n

    def replace_collection(self, staging: str, name: str) -> None:
        """Make ``name`` hold the points and metadata of ``staging``, then remove ``staging``.

        Used by ``--recreate`` (:func:`cbmir.ingest.job.ingest`): the new points are built in ``staging``
        while the old collection stays intact, so a run that fails or is interrupted part-way never
        loses it. This default (a Qdrant server, which has no rename) deletes ``name``, creates it with
        ``staging``'s metadata, copies every point (vectors and payload) page by page and deletes
        ``staging`` last, so an interrupted copy is redone by re-running the same command; engines
        that can rename do so (:meth:`cbmir.search.edge_store.EdgeStore.replace_collection`).

        Raises:
            CbmirError: ``staging`` does not exist.
        """
        self.meta(staging)
        self.delete_collection(name)
        copy_collection(self, staging, self, name)
        self.delete_collection(staging)

    def set_payloads(self, name: str, pairs: Sequence[tuple[int, dict]]) -> None:
        """Replace the payload of existing points ``[(point id, payload), ...]``; their vectors are not
        touched (a relabelled archive file keeps its stored vector bit for bit)."""
        pairs = [(int(i), dict(p)) for i, p in pairs]
        for lo in range(0, len(pairs), 256):
            self._overwrite_payload(name, pairs[lo:lo + 256])

    def scroll_payloads(self, name: str, where: str | Selection | None = None,
                        batch: int = 1024) -> Iterator[tuple[list[int], list[dict]]]:
        """Pages ``(point ids, payloads)`` of the points of ``where`` (a split, a
        :class:`~cbmir.search.filters.Selection`, or None for every point); no vectors are read."""
        self.meta(name)
        for ids, _, payloads in self._scroll(name, where, False, batch):
            yield ids, payloads

    def points_by_id(self, name: str, ids: Sequence[int], *, with_vectors: bool = True
                     ) -> dict[int, tuple[np.ndarray | None, dict]]:
        """``{point id: (vector float32 (dim,) | None, payload)}`` of the ``ids`` that exist (absent ids
        are left out), read :attr:`max_values_per_call` values at a time."""
        meta = self.meta(name)
        out: dict[int, tuple[np.ndarray | None, dict]] = {}
        ids = [int(i) for i in ids]
        step = rows_per_call(meta.dim, self.max_values_per_call) if with_vectors else 1024
        for lo in range(0, len(ids), step):
            for pid, chunks, pay in self._retrieve(name, ids[lo:lo + step], with_vectors):
                vec = (np.concatenate([np.asarray(chunks[c], dtype=np.float32) for c, _, _ in meta.layout])
                       if with_vectors else None)
                out[int(pid)] = (vec, pay)
        return out

    def disk_bytes(self, name: str) -> int | None:
        """Bytes the collection takes on disk, or None when the engine cannot tell (a server)."""
        return None

    def close(self) -> None:
        """Flush and release the engine's resources."""

    def release(self) -> int:
        """Give up what this store holds open between uses, keeping the object usable (the next call
        reopens it): the embedded engine closes its shards and frees their locks, so another process can
        open them. Returns how many collections were released (0: nothing to release, e.g. a server)."""
        return 0

    def __enter__(self) -> "VectorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- shared logic
    def ensure_collection(self, name: str, meta: CollectionMeta, *, recreate: bool = False) -> CollectionMeta:
        """Create ``name`` for ``meta``, or check that the existing collection holds the same configuration.

        Raises:
            CbmirError: the collection exists with another model, dim, distance, backend, weights or
                preprocessing; the message names both configurations and ``--recreate``.
        """
        existing = self.read_meta(name)
        if existing is not None and recreate:
            self.delete_collection(name)
            existing = None
        if existing is None:
            self._create(name, meta)
            return meta
        diff = existing.differences(meta)
        if diff:
            details = "; ".join(f"{k}: stored={a!r} requested={b!r}" for k, (a, b) in diff.items())
            raise CbmirError(
                f"collection {name!r} already holds another configuration ({details}).\n"
                f"  stored:    {existing.describe()}\n  requested: {meta.describe()}\n"
                "Use another collection, or pass --recreate to replace it (the new one is built beside it and "
                "swapped in when complete).")
        return existing

    def meta(self, name: str) -> CollectionMeta:
        """Metadata of an existing collection; CbmirError naming the store's collections when absent."""
        m = self.read_meta(name)
        if m is None:
            have = ", ".join(sorted(self.list_collections())) or "none"
            raise NotFoundError(f"collection {name!r} does not exist in the {self.engine} store "
                             f"(existing: {have}); run `cbmir ingest` first")
        return m

    def _prepare(self, meta: CollectionMeta, vectors: np.ndarray, what: str) -> np.ndarray:
        """Check shape / finiteness and, for cosine collections, L2-normalise in float64.

        **Zero-vector rule (cosine).** A vector whose entries are all exactly 0 (e.g. HOG of a
        constant image) has no direction; it is stored (and queried) as all zeros, and its cosine
        similarity with anything is defined as 0: as a database point it ranks after every point
        of positive similarity, as a query every score is 0 and the tie rule returns the lowest
        database rows. Every other finite vector, however small or large, is normalised here, once,
        for every layout, so that both engines see unit vectors: left to themselves, Qdrant Edge skips
        normalising vectors of squared norm below float32 epsilon (norm < 3.5e-4) and both engines
        overflow to a zero vector above about 1.8e19 per entry, while qdrant-client's local mode
        normalises everything — the engines would disagree. The ingest job reports the rows of
        zero vectors (:class:`cbmir.ingest.job.IngestReport`); NaN/inf rows are refused by
        :func:`_as_matrix`.
        """
        x = _as_matrix(vectors, meta.dim, what)
        if meta.distance == "cosine":
            x = _l2_normalise(x)  # whole-vector normalisation: chunk dot products sum to cosine
        return x

    def upsert(self, name: str, split: str, indices: Sequence[int], vectors: np.ndarray,
               payloads: list[dict]) -> None:
        """Upsert embeddings of rows ``indices`` of ``split`` (ids from :func:`point_id`; idempotent).

        Args:
            vectors: float32 ``(B, dim)``; NaN/inf rows are refused (CbmirError), nothing written.
            payloads: one dict per row (see :func:`cbmir.search.schema.make_payload`).
        """
        meta = self.meta(name)
        x = self._prepare(meta, vectors, f"vectors for {name!r}")
        if not (len(indices) == len(x) == len(payloads)):
            raise CbmirError(f"upsert to {name!r}: {len(indices)} indices, {len(x)} vectors, "
                             f"{len(payloads)} payloads — lengths must match")
        ids = [point_id(split, i) for i in indices]
        self._rerank_cache = None  # vectors change: drop the re-rank cache
        step = rows_per_call(meta.dim, self.max_values_per_call)
        for lo in range(0, len(ids), step):
            chunks = {c: x[lo:lo + step, a:b] for c, a, b in meta.layout}
            self._upsert(name, ids[lo:lo + step], chunks, payloads[lo:lo + step])

    def search(self, name: str, queries: np.ndarray, k: int, *, split: str | Selection = "train",
               exclude_ids: Sequence[Sequence[int]] | None = None, exact: bool | None = None,
               ef: int | None = None) -> SearchResult:
        """Top-``k`` of each query among the points of ``split`` (the database): a split name, or a
        :class:`~cbmir.search.filters.Selection` (a split and a payload filter; only matching points
        are scored, so the result stays exact).

        Exact for an exact collection (the default mode) or with ``exact=True``; ties in similarity are
        then broken by lower database index (DESIGN.md §2), so results are deterministic and equal a
        brute-force ranking. A collection created in an approximate mode (:mod:`cbmir.search.index_config`)
        is searched in that mode unless ``exact=True``.

        Args:
            queries: float32 ``(Q, dim)`` or ``(dim,)``.
            k: number of results per query (clipped to the database size).
            exclude_ids: optional per-query point ids to leave out (e.g. the query itself).
            exact: True: exact search whatever the collection's mode; None / False: the collection's mode.
            ef: HNSW query-time candidate list for an ``hnsw`` collection (None: the collection's ``ef``).

        Returns:
            :class:`SearchResult` with ``(Q, k)`` arrays.
        """
        meta = self.meta(name)
        q = self._prepare(meta, queries, "query vectors")
        n_db = self.count(name, split)
        if n_db == 0:
            raise CbmirError(f"collection {name!r} has no points in split {split!r} to search")
        k = min(int(k), n_db)
        if k < 1:
            raise CbmirError(f"k must be >= 1, got {k}")
        excl = [set(map(int, e)) for e in exclude_ids] if exclude_ids is not None else [set()] * len(q)
        lower_better = meta.distance == "euclidean"
        cfg = meta.index_config()
        mode = cfg.with_ef(ef) if cfg.approximate and not exact else None
        if len(meta.layout) == 1:
            hits = self._search_single(name, meta, q, k, n_db, split, excl, lower_better, mode)
        else:
            hits = self._search_chunked(name, meta, q, n_db, split, lower_better)
        rerank = self.exact_rerank
        if mode is None and (rerank is True or (rerank == "auto" and (meta.is_3d or len(meta.layout) > 1))):
            hits = self._exact_rerank(name, meta, q, hits, k, n_db, split, excl, lower_better)
        return self._finish(hits, k, excl, lower_better)

    def _search_single(self, name, meta, q, k, n_db, split, excl, lower_better, mode=None):
        vname = meta.layout[0][0]
        pad = max(len(e) for e in excl) if excl else 0
        limit = min(n_db, k + TIE_MARGIN + pad)
        out = self._query_rows(name, vname, q, limit, split, mode)
        for i, res in enumerate(out):
            lim = limit
            while lim < n_db and len(res) >= lim and self._tie_at_boundary(res, k + len(excl[i]), lower_better):
                lim = min(n_db, lim * 4)
                res = self._query(name, vname, q[i:i + 1], lim, split, mode)[0]
            out[i] = res
        return out

    def _query_rows(self, name, vector_name, queries, limit, split, mode=None):
        """:meth:`_query` in groups of at most :attr:`max_values_per_call` query values per call."""
        step = rows_per_call(queries.shape[1], self.max_values_per_call)
        out = []
        for lo in range(0, len(queries), step):
            out.extend(self._query(name, vector_name, queries[lo:lo + step], limit, split, mode))
        return out

    @staticmethod
    def _tie_at_boundary(res, k, lower_better) -> bool:
        s = sorted((sc for _, sc in res), reverse=not lower_better)
        return k <= len(s) and s[min(k, len(s)) - 1] == s[-1]

    def _search_chunked(self, name, meta, q, n_db, split, lower_better):
        # Exact: every chunk scores every database point; per-point scores are then combined.
        total: list[dict[int, float]] = [dict() for _ in range(len(q))]
        for vname, a, b in meta.layout:
            res = self._query_rows(name, vname, np.ascontiguousarray(q[:, a:b]), n_db, split)
            for i, r in enumerate(res):
                acc = total[i]
                for pid, sc in r:
                    acc[pid] = acc.get(pid, 0.0) + (sc * sc if lower_better else sc)
        if lower_better:
            return [[(pid, float(np.sqrt(s))) for pid, s in t.items()] for t in total]
        return [list(t.items()) for t in total]

    def _exact_rerank(self, name, meta, q, hits, k, n_db, split, excl, lower_better):
        """Make the top-``k`` exact: re-score in float64 the candidates the engine's float32 scores
        cannot order with certainty.

        Engine scores are within ``e`` (:func:`score_error_bound`) of the exact ones. Per query, the
        *band* is every candidate whose engine score is within ``2e`` of the ``k``-th (for a single
        chunk the engine is asked for more candidates until the band ends inside its answer; a
        chunked search already scored every point). When the band holds exactly ``k`` points whose
        engine scores are more than ``2e`` apart, the engine's order is provably exact and kept.
        Otherwise the band's stored vectors are read back and scored in float64 as a numpy brute force
        would (:meth:`_float64_scores`; cosine: float64 dot product over float64 norms; Euclidean:
        ``sqrt(sum((q - x)^2))``); :meth:`_finish` then ranks them, ties by lower database index.
        Vectors read back are cached per collection (:meth:`_rerank_rows`, up to
        :data:`RERANK_CACHE_VALUES` values; dropped on any upsert through this store object or a
        change of the split's point count).
        """
        rho = score_error_bound(max(b - a for _, a, b in meta.layout), len(meta.layout))
        q64 = q.astype(np.float64)
        qnorm = np.linalg.norm(q64, axis=1)
        out = list(hits)
        need: dict[int, list[int]] = {}
        for i, res in enumerate(hits):
            res = [h for h in res if h[0] not in excl[i]]
            while res:
                res.sort(key=(lambda h: (h[1], h[0])) if lower_better else (lambda h: (-h[1], h[0])))
                kk = min(k, len(res))
                sc = np.asarray([h[1] for h in res], dtype=np.float64)
                if lower_better:  # squared distances, error relative to (|q| + |x|)^2 <= (2|q| + d)^2
                    d2, err = sc * sc, rho * (2 * qnorm[i] + sc) ** 2
                    in_band = d2 - err <= d2[kk - 1] + err[kk - 1]
                    sure = bool(np.all(d2[1:kk] - d2[:kk - 1] > err[1:kk] + err[:kk - 1]))
                else:
                    in_band = sc >= sc[kk - 1] - 2 * rho
                    sure = bool(np.all(sc[:kk - 1] - sc[1:kk] > 2 * rho))
                n_band = int(np.flatnonzero(in_band).max()) + 1
                if n_band < len(res) or len(res) + len(excl[i]) >= n_db or len(meta.layout) > 1:
                    break
                lim = min(n_db, 4 * (len(res) + len(excl[i])))
                res = [h for h in self._query(name, meta.layout[0][0], q[i:i + 1], lim, split)[0]
                       if h[0] not in excl[i]]
            out[i] = res
            if res and not (sure and n_band == kk):
                need[i] = [pid for pid, _ in res[:n_band]]
        if not need:
            return out
        scores = self._float64_scores(name, meta, split, q64, qnorm, need, lower_better)
        for i, ids in need.items():
            out[i] = [(pid, float(v)) for pid, v in zip(ids, scores[i])]
        return out

    def _float64_scores(self, name: str, meta: CollectionMeta, split: str, q64: np.ndarray,
                        qnorm: np.ndarray, need: dict[int, list[int]], lower_better: bool) -> dict[int, np.ndarray]:
        """Float64 scores of query rows ``i`` (keys of ``need``) against their candidate point ids.

        Args:
            q64: float64 ``(Q, dim)`` queries; qnorm: float64 ``(Q,)`` their L2 norms.
            need: query row -> candidate point ids of ``split``.
            lower_better: Euclidean (``sqrt(sum((q - x)^2))``, row-wise) instead of cosine.

        Returns:
            query row -> float64 ``(len(need[i]),)`` scores in the order of ``need[i]``.

        Cosine: ``(q / |q|) . x / |x|`` with the stored float32 ``x`` widened to float64 and ``|.|``
        float64 norms, as one blocked float64 matrix product (BLAS) of all queries against all
        distinct candidates, instead of a per-query loop that re-stacked and re-normalised the same
        candidates for every query (issue #4: ~1.8 s per query on 1,188 x 65,536). Identical stored
        vectors share one row (:meth:`_rerank_rows`), so they get one score and tie (-> lower database
        index) whatever the BLAS summation order. Zero vectors and zero queries score 0.
        """
        rows, norms, slot_of = self._rerank_rows(name, meta, split,
                                                 sorted({p for ids in need.values() for p in ids}))
        qs = sorted(need)
        used = np.unique(np.fromiter((slot_of[p] for i in qs for p in need[i]), dtype=np.int64))
        every = len(used) * 2 > len(rows)  # most rows needed: score them all, no gather copy
        cols = np.arange(len(rows)) if every else used
        col_of = np.full(len(rows), -1, dtype=np.int64)
        col_of[cols] = np.arange(len(cols))
        dim = q64.shape[1]
        scores = np.empty((len(qs), len(cols)))
        if not lower_better:
            qn = np.divide(q64[qs], qnorm[qs, None], out=np.zeros((len(qs), dim)), where=qnorm[qs, None] > 0)
        block = max(1, (1 << 24) // dim)  # database rows per float64 block (128 MB)
        for lo in range(0, len(cols), block):
            hi = min(lo + block, len(cols))
            x = (rows[lo:hi] if every else rows[cols[lo:hi]]).astype(np.float64)
            if lower_better:  # row-wise sums: the same summation order for every row
                for r, i in enumerate(qs):
                    scores[r, lo:hi] = np.sqrt(((x - q64[i]) ** 2).sum(axis=1))
            else:
                xn = norms[cols[lo:hi]]
                np.divide(qn @ x.T, xn, out=scores[:, lo:hi], where=xn > 0)
                scores[:, lo:hi][:, xn <= 0] = 0.0
        return {i: scores[r, col_of[[slot_of[p] for p in need[i]]]] for r, i in enumerate(qs)}

    def _rerank_rows(self, name, meta, split, ids) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
        """Distinct stored vectors of point ``ids`` (chunks joined in layout order), via a per-collection cache.

        Returns:
            ``(rows, norms, slot)``: float32 ``(U, dim)`` distinct vectors, float64 ``(U,)`` their L2
            norms, and point id -> row of ``rows``. Identical vectors (same bytes: 128-bit BLAKE2b
            digest) share one row.

        The cache holds up to :data:`RERANK_CACHE_VALUES` float32 values and is dropped on any upsert
        through this store object or a change of the split's point count.
        """
        key = (name, split, self.count(name, split))
        c = getattr(self, "_rerank_cache", None)
        if c is None or c["key"] != key:
            c = {"key": key, "slot": {}, "row_of": {}, "rows": np.zeros((0, meta.dim), dtype=np.float32),
                 "norms": np.zeros(0)}
        self._rerank_cache = c
        missing = [p for p in ids if p not in c["slot"]]
        if not missing:
            return c["rows"], c["norms"], c["slot"]
        step = rows_per_call(meta.dim, self.max_values_per_call)
        new: list[np.ndarray] = []
        slot, row_of = dict(c["slot"]), dict(c["row_of"])
        for lo in range(0, len(missing), step):
            for pid, chunks, _ in self._retrieve(name, missing[lo:lo + step], True):
                v = np.concatenate([np.asarray(chunks[ch], dtype=np.float32) for ch, _, _ in meta.layout])
                j = row_of.setdefault(hashlib.blake2b(v.view(np.uint8), digest_size=16).digest(),
                                      len(c["rows"]) + len(new))
                if j == len(c["rows"]) + len(new):
                    new.append(v)
                slot[pid] = j
        rows, norms = c["rows"], c["norms"]
        if new:
            x = np.stack(new)
            rows = np.concatenate([rows, x])
            norms = np.concatenate([norms, np.sqrt((x.astype(np.float64) ** 2).sum(axis=1))])
        if rows.size <= RERANK_CACHE_VALUES:  # else: this call only; the cache keeps what it held
            c.update(rows=rows, norms=norms, slot=slot, row_of=row_of)
        return rows, norms, slot

    @staticmethod
    def _finish(hits, k, excl, lower_better) -> SearchResult:
        Q = len(hits)
        ids = np.zeros((Q, k), dtype=np.int64)
        scores = np.zeros((Q, k), dtype=np.float32)
        for i, res in enumerate(hits):
            res = [h for h in res if h[0] not in excl[i]]
            res.sort(key=(lambda h: (h[1], h[0])) if lower_better else (lambda h: (-h[1], h[0])))
            if len(res) < k:
                raise CbmirError(f"query {i}: only {len(res)} database points left after exclusions, k={k}")
            ids[i] = [h[0] for h in res[:k]]
            scores[i] = [h[1] for h in res[:k]]
        idx = ids & ((1 << 40) - 1)
        return SearchResult(ids=ids, indices=idx, scores=scores)

    def fetch(self, name: str, split: str, *,
              with_vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
        """All points of ``split`` in row order: ``(indices int64 (N,), vectors float32 (N, dim) | None, payloads)``.

        Vectors are as stored: for cosine collections with several chunks, L2-normalised as a whole.
        """
        meta = self.meta(name)
        ids_all: list[int] = []
        vecs: list[np.ndarray] = []
        pays: list[dict] = []
        page = rows_per_call(meta.dim, self.max_values_per_call) if with_vectors else 1024
        for ids, chunks, payloads in self._scroll(name, split, with_vectors, page):
            ids_all.extend(ids)
            pays.extend(payloads)
            if with_vectors:
                vecs.append(np.concatenate([chunks[c] for c, _, _ in meta.layout], axis=1))
        order = np.argsort(np.asarray(ids_all, dtype=np.int64), kind="stable")
        indices = np.asarray([split_and_index(ids_all[j])[1] for j in order], dtype=np.int64)
        pays = [pays[j] for j in order]
        vectors = None
        if with_vectors:
            vectors = (np.concatenate(vecs, axis=0)[order] if vecs
                       else np.zeros((0, meta.dim), dtype=np.float32)).astype(np.float32)
        return indices, vectors, pays

    def get_points(self, name: str, split: str, indices: Sequence[int], *, with_vectors: bool = True
                   ) -> tuple[np.ndarray | None, list[dict]]:
        """Stored points of rows ``indices`` of ``split``: ``(vectors (n, dim) | None, payloads)``.

        Raises:
            CbmirError: a requested point is not in the collection.
        """
        meta = self.meta(name)
        ids = [point_id(split, i) for i in indices]
        got = {pid: (ch, pl) for pid, ch, pl in self._retrieve(name, ids, with_vectors)}
        missing = [split_and_index(p)[1] for p in ids if p not in got]
        if missing:
            raise CbmirError(f"collection {name!r} has no {split} point(s) with index {missing[:10]}")
        pays = [got[p][1] for p in ids]
        if not with_vectors:
            return None, pays
        vecs = np.stack([np.concatenate([got[p][0][c] for c, _, _ in meta.layout]) for p in ids]).astype(np.float32)
        return vecs, pays


def copy_collection(src: VectorStore, name: str, dst: VectorStore, dst_name: str) -> None:
    """Create ``dst_name`` in ``dst`` with the metadata of ``name`` in ``src`` and copy every point (ids,
    vectors as stored, payloads) page by page; ``dst_name`` must not exist. Both stores may be one
    (``--recreate``'s swap on a server) or different engines (a snapshot of a server collection, restored
    into either engine: :mod:`cbmir.search.snapshot`)."""
    meta = src.meta(name)
    dst._create(dst_name, meta)  # noqa: SLF001 - engine primitive of the same class family
    page = rows_per_call(meta.dim, min(src.max_values_per_call, dst.max_values_per_call))
    for ids, chunks, payloads in src._scroll(name, None, True, page):  # noqa: SLF001
        dst._upsert(dst_name, ids, chunks, payloads)  # noqa: SLF001
    flush = getattr(dst, "flush", None)
    if flush:
        flush(dst_name)


def engine_distance(meta: CollectionMeta) -> str:
    """Distance configured in the engine for ``meta``: ``cosine`` (one chunk), ``dot`` (several chunks
    of a whole-vector-normalised cosine vector) or ``euclidean``."""
    if meta.distance == "euclidean":
        return "euclidean"
    return "cosine" if len(meta.layout) == 1 else "dot"


def open_store(settings=None, *, store_path=None, qdrant_url=None, api_key=None) -> VectorStore:
    """Open the configured store: a Qdrant server when ``qdrant_url`` (``CBMIR_QDRANT_URL``) is set,
    else the embedded Qdrant Edge engine at ``store_path`` (``CBMIR_STORE_PATH``).
    """
    if settings is not None:
        store_path = store_path or settings.store_path
        qdrant_url = qdrant_url or settings.qdrant_url
        if api_key is None and settings.qdrant_api_key is not None:
            api_key = settings.qdrant_api_key.get_secret_value()
    if qdrant_url:
        from cbmir.search.cluster import ClusterConfig
        from cbmir.search.server_store import ServerStore

        timeout = getattr(settings, "qdrant_timeout_s", 60.0) if settings is not None else 60.0
        retry = getattr(settings, "qdrant_retry_s", 120.0) if settings is not None else 120.0
        given = {k: getattr(settings, f"qdrant_{k}", None) for k in (
            "shard_number", "replication_factor", "write_consistency_factor", "read_consistency", "prefer_grpc",
            "grpc_port")}
        cluster = ClusterConfig(**{k: v for k, v in given.items() if v is not None})
        return ServerStore(url=qdrant_url, api_key=api_key, timeout=timeout, retry_total_s=retry, cluster=cluster)
    from cbmir.search.edge_store import EdgeStore

    wait = float(getattr(settings, "lock_wait_s", 0.0) or 0.0) if settings is not None else 0.0
    return EdgeStore(store_path or ".cbmir/store", lock_wait_s=wait)
