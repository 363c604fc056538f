"""Exact top-k by blocked matrix multiplication: the BLAS cross-check path (``--search-backend blas``).

The vectors are read back from the store (:meth:`cbmir.search.store.VectorStore.fetch`), so this path
checks the engine's answers with an independent computation over the *same stored vectors*, and is
the "blocked BLAS matmul + top-k" yardstick of DESIGN.md §5.

Algorithm (exact, memory bounded by the block size, never ``queries x database``):

1. **Candidates (float32 sgemm).** For a block of ``bq`` queries and a block of ``bn`` database
   rows, one ``sgemm`` gives the ``(bq, bn)`` score block (cosine: dot product of L2-normalised
   vectors; euclidean: ``q.x - |x|^2 / 2``, which ranks like ``-|q - x|^2``). The block's
   top-``L`` per query (``L = k + margin``) is found without a full partition of the block: the
   columns are split into ``bn / g`` groups of ``g`` (column ``j`` belongs to group ``j mod bn/g``),
   the group maxima are taken (one vectorised pass), the ``L`` best groups are selected with
   ``np.argpartition``, and only their ``L * g`` members are partitioned. Every element outside
   those groups is <= the ``L``-th best group maximum, so the union of the selected groups holds a
   valid top-``L``. From the second block on, only the groups whose maximum beats the row's running
   ``L``-th best are opened and merged into the running ``(Q, L)`` top-``L``, so a block costs little
   more than one pass over it. The selection runs on one thread per CPU (row ranges; numpy releases
   the GIL), between the sgemm calls, which use the BLAS library's own threads.
2. **Completeness check.** float32 scores differ from the exact ones by at most ``e`` per pair
   (``e = 2 (gamma_D + 2u) * scale``, ``gamma_D = D u / (1 - D u)``, ``u = 2**-24``, scale from the
   vector norms: the classic worst-case bound of a length-``D`` float dot product, doubled). When
   the ``L``-th candidate is more than ``2e`` below the ``k``-th, no row outside the candidates can
   belong to the exact top-``k``. Queries that fail the check (near-ties, duplicate vectors) are
   redone in float64 with ``4 L`` candidates, repeatedly, up to the whole database.
3. **Exact ranking.** Candidates are re-scored in float64 from the float32 vectors (each product is
   exact; the sum is formed in the same order for every pair, so identical vectors get identical
   scores; cosine: the dot product divided by both float64 norms, as a numpy brute force on the stored
   vectors and the store's float64 re-ranking compute it) and ranked by score (cosine: descending;
   euclidean distance: ascending), ties broken by the lower database index (DESIGN.md §2) — the
   store's rule.

Returned scores are float32: cosine similarity, or the Euclidean distance ``|q - x|`` (not
squared), as the stores return them. Zero vectors under cosine score 0 against everything (the
store's zero-vector rule, :meth:`cbmir.search.store.VectorStore._prepare`).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cbmir.core.errors import CbmirError
from cbmir.search.schema import point_id
from cbmir.search.store import SearchResult, VectorStore, _as_matrix, _l2_normalise

_U32 = 2.0 ** -24
_U64 = 2.0 ** -53
#: Candidates kept per query beyond ``k`` in the float32 pass (more are fetched only on near-ties).
MARGIN = 8
#: Default memory of one float32 score block, in bytes (``bq * bn * 4``).
BLOCK_BYTES = 32 << 20
_GROUP = 16


def _gamma(d: int, u: float) -> float:
    du = d * u
    if du >= 0.5:
        return float("inf")
    return du / (1.0 - du)


def _n_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _limit_blas_threads(threads: int | None):
    """Context manager limiting BLAS threads (threadpoolctl) when ``threads`` is given, else a no-op."""
    import contextlib

    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=int(threads), user_api="blas")


def _block_topl(s: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``L`` (unordered) of each row of the score block ``s`` ``(bq, bn)``: ``(values, columns)``.

    Uses the group-maximum pre-selection of the module docstring when the block is large enough.
    """
    bq, bn = s.shape
    if bn <= L:
        cols = np.broadcast_to(np.arange(bn), (bq, bn))
        return s, np.ascontiguousarray(cols)
    g = _GROUP
    ng = bn // g
    if ng <= L or bn % g:
        cols = np.argpartition(s, bn - L, axis=1)[:, bn - L:]
        return np.take_along_axis(s, cols, axis=1), cols
    gmax = np.maximum.reduce(s.reshape(bq, g, ng), axis=1)  # group j = columns j, j+ng, j+2ng, ...
    grp = np.argpartition(gmax, ng - L, axis=1)[:, ng - L:]  # (bq, L) best groups
    cols = (grp[:, :, None] + ng * np.arange(g)[None, None, :]).reshape(bq, L * g)
    vals = np.take_along_axis(s, cols, axis=1)
    part = np.argpartition(vals, L * g - L, axis=1)[:, L * g - L:]
    return np.take_along_axis(vals, part, axis=1), np.take_along_axis(cols, part, axis=1)


def _merge(best, v: np.ndarray, c: np.ndarray, L: int):
    """Running top-``L`` ``(values, rows)``: merge the block's candidates ``(v, c)`` into ``best``."""
    if best is None:
        return v.copy(), c
    mv = np.concatenate([best[0], v], axis=1)
    mi = np.concatenate([best[1], c], axis=1)
    keep = min(L, mv.shape[1])
    p = np.argpartition(mv, mv.shape[1] - keep, axis=1)[:, mv.shape[1] - keep:]
    return np.take_along_axis(mv, p, axis=1), np.take_along_axis(mi, p, axis=1)


def _merge_above(best_v: np.ndarray, best_i: np.ndarray, s: np.ndarray, offset: int) -> None:
    """Merge the score block ``s`` ``(b, n)`` into the running top-``L`` ``(best_v, best_i)`` (in place).

    Only elements above each row's current ``L``-th best can enter, and those are found through the
    group maxima (one pass over ``s``): with a running threshold, after the first blocks only a
    handful of groups per row pass, so this costs little more than reading the block once.
    """
    b, n = s.shape
    L = best_v.shape[1]
    g = _GROUP
    ng = n // g
    t = best_v.min(axis=1)
    if ng == 0 or n % g:
        rows, cols = np.nonzero(s > t[:, None])
    else:
        gmax = np.maximum.reduce(s.reshape(b, g, ng), axis=1)
        rows, grp = np.nonzero(gmax > t[:, None])
        if not len(rows):
            return
        cols = (grp[:, None] + ng * np.arange(g)).ravel()
        rows = np.repeat(rows, g)
        keep = s[rows, cols] > t[rows]
        rows, cols = rows[keep], cols[keep]
    if not len(rows):
        return
    vals = s[rows, cols]
    hit = np.unique(rows)  # rows with new candidates: merge their L best with them
    pos = np.searchsorted(hit, rows)
    all_r = np.concatenate([np.repeat(np.arange(len(hit)), L), pos])
    all_v = np.concatenate([best_v[hit].ravel(), vals])
    all_i = np.concatenate([best_i[hit].ravel(), cols.astype(np.int64) + offset])
    order = np.lexsort((-all_v, all_r))  # by row, best first
    counts = np.bincount(all_r, minlength=len(hit))
    first = np.cumsum(counts) - counts
    take = order[(first[:, None] + np.arange(L)).ravel()].reshape(len(hit), L)
    best_v[hit] = all_v[take]
    best_i[hit] = all_i[take]


def _candidates(q: np.ndarray, x: np.ndarray, x_half_sq: np.ndarray | None, L: int, dtype,
                block_bytes: int, pool: ThreadPoolExecutor | None = None,
                n_parts: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Top-``L`` approximate scores per query over all of ``x``: ``(scores (Q, L) desc, rows (Q, L))``.

    ``x_half_sq`` (float64 ``(N,)``, ``|x|^2 / 2``) selects the euclidean score ``q.x - |x|^2/2``.
    The matmul of each block uses the BLAS library's threads; the selection that follows is split
    over ``n_parts`` row ranges run on ``pool`` (numpy releases the GIL in these calls).
    Memory: one ``(bq, bn)`` score block of about ``block_bytes`` plus the ``(Q, L)`` result.
    """
    Q, D = q.shape
    N = x.shape[0]
    item = np.dtype(dtype).itemsize
    bq = int(max(1, min(Q, 1024, block_bytes // (16 * 4 * L))))
    bn = max(L * _GROUP * 4, block_bytes // (item * bq))
    bn = int(min(N, bn - bn % _GROUP))
    out_v = np.empty((Q, L), dtype=dtype)
    out_i = np.empty((Q, L), dtype=np.int64)
    buf = np.empty((bq, bn), dtype=dtype)
    qd = q.astype(dtype, copy=False)
    hs = None if x_half_sq is None else x_half_sq.astype(dtype)
    for qa in range(0, Q, bq):
        qb = qd[qa:qa + bq]
        nq = len(qb)
        parts = [(a, min(nq, a + -(-nq // n_parts))) for a in range(0, nq, -(-nq // n_parts))]
        best: list = [None] * len(parts)
        for na in range(0, N, bn):
            xb = x[na:na + bn]
            if xb.dtype != dtype:
                xb = xb.astype(dtype)
            nb = len(xb)
            s = buf if (nq, nb) == buf.shape else buf[:nq, :nb]
            np.matmul(qb, xb.T, out=s)

            def select(j: int, na=na, nb=nb, s=s) -> None:
                a, b = parts[j]
                sj = s[a:b]
                if hs is not None:
                    sj -= hs[na:na + nb]
                if best[j] is not None and best[j][0].shape[1] == L:
                    _merge_above(best[j][0], best[j][1], sj, na)  # running threshold
                else:
                    v, c = _block_topl(sj, min(L, nb))
                    best[j] = _merge(best[j], v, c + na, L)

            if pool is None or len(parts) == 1:
                for j in range(len(parts)):
                    select(j)
            else:
                for f in [pool.submit(select, j) for j in range(len(parts))]:
                    f.result()
        best_v = np.concatenate([b[0] for b in best])
        best_i = np.concatenate([b[1] for b in best])
        order = np.argsort(-best_v, axis=1, kind="stable")
        out_v[qa:qa + nq] = np.take_along_axis(best_v, order, axis=1)
        out_i[qa:qa + nq] = np.take_along_axis(best_i, order, axis=1)
    return out_v, out_i


def _exact_scores(q: np.ndarray, x: np.ndarray, rows: np.ndarray, euclidean: bool,
                  budget: int = 1 << 22) -> np.ndarray:
    """float64 ``(Q, C)`` exact scores of candidate ``rows`` ``(Q, C)``: dot product, or minus the
    squared Euclidean distance.

    Products of float32 values are exact in float64 and each sum is formed in the same order for
    every (query, row) pair, so identical vectors score identically. Works on at most ``budget``
    float64 values (32 MiB) at a time.
    """
    Q, C = rows.shape
    D = x.shape[1]
    out = np.empty((Q, C), dtype=np.float64)
    cc = int(max(1, min(C, budget // max(D, 1))))
    qc = int(max(1, budget // (cc * max(D, 1))))
    for a in range(0, Q, qc):
        q64 = q[a:a + qc].astype(np.float64)[:, None, :]
        for b in range(0, C, cc):
            xc = x[rows[a:a + qc, b:b + cc]].astype(np.float64)  # (qc, cc, D)
            if euclidean:
                xc -= q64
                np.square(xc, out=xc)
                out[a:a + qc, b:b + cc] = -xc.sum(axis=2)
            else:
                xc *= q64
                out[a:a + qc, b:b + cc] = xc.sum(axis=2)
    return out


def _complete(vals: np.ndarray, k: int, L: int, N: int, err) -> np.ndarray:
    """bool ``(Q,)``: the ``L`` candidates (scores sorted descending) surely hold the exact top-``k``."""
    if L >= N:
        return np.ones(len(vals), dtype=bool)
    return vals[:, L - 1].astype(np.float64) < vals[:, k - 1].astype(np.float64) - 2.0 * np.asarray(err)


def exact_topk(queries: np.ndarray, database: np.ndarray, k: int, *, distance: str = "cosine",
               normalised: bool = False, block_bytes: int = BLOCK_BYTES, margin: int = MARGIN,
               threads: int | None = None, database_norms: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``database`` for every query by blocked sgemm (see module docstring).

    Args:
        queries: float32 ``(Q, D)`` (or ``(D,)``); finite.
        database: float32 ``(N, D)``; finite. Row position = database order for ties.
        k: results per query; clipped to ``N``.
        distance: ``cosine`` (similarity, higher first) or ``euclidean`` (distance, lower first).
        normalised: cosine only: the rows are already L2-normalised (as the store keeps them), so
            they are not normalised again. Zero vectors stay zero (similarity 0 to everything).
        block_bytes: memory of one float32 score block (default 32 MiB); peak extra memory is a few
            such blocks plus ``Q * (k + margin)`` candidates, independent of ``Q * N``.
        margin: extra float32 candidates per query (more are taken only for near-ties).
        threads: BLAS threads (threadpoolctl); None keeps the library's setting (all cores).
        database_norms: float64 ``(N,)`` L2 norms of the (normalised) database rows, precomputed by
            the caller (:class:`BlasIndex`); then the database is taken as checked (finite,
            float32, C-contiguous) and is neither checked nor normalised again.

    Returns:
        ``(rows int64 (Q, k), scores float32 (Q, k))``: database row positions in rank order and
        their cosine similarity / Euclidean distance; ties broken by lower row position.

    Raises:
        CbmirError: shapes disagree, the database is empty, ``k < 1``, non-finite values or an
            unknown distance.
    """
    if distance not in ("cosine", "euclidean"):
        raise CbmirError(f"unknown distance {distance!r}; valid: cosine, euclidean")
    x = np.asarray(database)
    if x.ndim != 2:
        raise CbmirError(f"database vectors must have shape (N, D); got {x.shape}")
    if database_norms is None:
        x = _as_matrix(x, x.shape[1], "database vectors")
    q = _as_matrix(queries, x.shape[1], "query vectors")
    N, D = x.shape
    if N == 0:
        raise CbmirError("the database is empty: nothing to search")
    k = min(int(k), N)
    if k < 1:
        raise CbmirError(f"k must be >= 1, got {k}")
    euclid = distance == "euclidean"
    if not euclid:
        q = _l2_normalise(q)
        if not normalised and database_norms is None:
            x = _l2_normalise(x)
    Q = len(q)
    out_rows = np.empty((Q, k), dtype=np.int64)
    out_scores = np.empty((Q, k), dtype=np.float32)
    if Q == 0:
        return out_rows, out_scores
    xn = database_norms if database_norms is not None else np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    qn = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    x_half_sq = 0.5 * xn * xn if euclid else None
    xmax = float(xn.max())
    # per-query bound scale of one approximate score's error (module docstring, step 2)
    scale = (qn + xmax) ** 2 if euclid else qn * xmax

    todo = np.arange(Q)
    if not euclid:  # a zero query scores exactly 0 against every row: the first k rows, by the tie rule
        zero = qn == 0
        out_rows[zero] = np.arange(k)
        out_scores[zero] = 0.0
        todo = np.flatnonzero(~zero)
    done: list[tuple[np.ndarray, np.ndarray]] = []
    L = min(N, k + int(margin))
    dtype, u = np.float32, _U32
    n_parts = max(1, int(threads or _n_cpus()))
    with _limit_blas_threads(threads), ThreadPoolExecutor(n_parts) as pool:
        while len(todo):
            vals, rows = _candidates(q[todo], x, x_half_sq, L, dtype, block_bytes, pool, n_parts)
            ok = _complete(vals, k, L, N, 2.0 * (_gamma(D, u) + 2 * u) * scale[todo])
            done.append((todo[ok], rows[ok]))
            todo = todo[~ok]
            L, dtype, u = min(N, 4 * L), np.float64, _U64  # near-ties: wider, in float64

    for qi, r in done:
        if not len(qi):
            continue
        s = _exact_scores(q[qi], x, r, euclid)
        if not euclid:  # cosine of the stored vectors, both re-normalised in float64 (as the store re-ranks)
            den = qn[qi][:, None] * xn[r]
            s = np.divide(s, den, out=np.zeros_like(s), where=den > 0)
        order = np.lexsort((r, -s), axis=-1)[:, :k]
        out_rows[qi] = np.take_along_axis(r, order, axis=1)
        best = np.take_along_axis(s, order, axis=1)
        out_scores[qi] = np.sqrt(np.maximum(-best, 0.0)) if euclid else best
    return out_rows, out_scores


@dataclass
class BlasIndex:
    """The database split of a collection held in memory for :func:`exact_topk`.

    Attributes:
        name: collection; split: database split.
        distance: the collection's distance (``cosine`` / ``euclidean``).
        indices: int64 ``(N,)`` row index of each database point, ascending.
        vectors: float32 ``(N, dim)`` stored vectors (cosine: L2-normalised as the store keeps them).
        payloads: one payload dict per database point.
        fetch_s: seconds spent reading them from the store.
        norms: float64 ``(N,)`` L2 norm of each vector (computed once, with the finiteness check).
    """

    name: str
    split: str
    distance: str
    indices: np.ndarray
    vectors: np.ndarray
    payloads: list
    fetch_s: float = 0.0
    norms: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        v = np.asarray(self.vectors)
        if v.ndim != 2:
            raise CbmirError(f"database vectors must have shape (N, D); got {v.shape}")
        self.vectors = _as_matrix(v, v.shape[1], f"stored vectors of {self.name!r}")
        self.norms = np.sqrt(np.einsum("ij,ij->i", self.vectors, self.vectors, dtype=np.float64))

    @classmethod
    def from_store(cls, store: VectorStore, name: str, split: str = "train") -> "BlasIndex":
        """Read every point of ``split`` of collection ``name`` (vectors + payloads) from ``store``.

        Raises:
            CbmirError: the collection does not exist or the split is empty.
        """
        meta = store.meta(name)
        t0 = time.perf_counter()
        idx, vec, pay = store.fetch(name, split, with_vectors=True)
        if len(idx) == 0:
            raise CbmirError(f"collection {name!r} has no points in split {split!r} to search")
        return cls(name=name, split=split, distance=meta.distance, indices=idx, vectors=vec, payloads=pay,
                   fetch_s=time.perf_counter() - t0)

    def search(self, queries: np.ndarray, k: int, **kw) -> SearchResult:
        """Exact top-``k`` for float32 queries ``(Q, dim)``; same result layout and tie rule as
        :meth:`cbmir.search.store.VectorStore.search` (keyword arguments go to :func:`exact_topk`)."""
        rows, scores = exact_topk(queries, self.vectors, k, distance=self.distance,
                                  normalised=self.distance == "cosine", database_norms=self.norms, **kw)
        indices = self.indices[rows]
        ids = (np.int64(point_id(self.split, 0)) | indices).astype(np.int64)
        return SearchResult(ids=ids, indices=indices, scores=scores)


def blas_search(store: VectorStore, name: str, queries: np.ndarray, k: int, *, split: str = "train",
                **kw) -> SearchResult:
    """One-shot :meth:`BlasIndex.search` over the ``split`` points of collection ``name`` in ``store``."""
    return BlasIndex.from_store(store, name, split).search(queries, k, **kw)
