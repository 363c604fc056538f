"""The evaluation run: every query (test) point against the database (train) points, through the store.

Implements the study's protocol (DESIGN.md §1): zero-shot, train split = database, test split =
queries, top-k by exact search, metrics of :mod:`cbmir.evaluation.metrics`. The search is exact whatever
the collection's search mode: a collection created for approximate serving (HNSW / quantization,
:mod:`cbmir.search.index_config`) is evaluated by exact search (``store.search(..., exact=True)``), so its
metrics are the study's; its approximate recall is measured separately (``cbmir.benchmarks.recall``).
Beyond the study:

* labels: unlabelled rows (-1) are left out as queries and never relevant as hits; multi-label
  collections are refused; ordinal grades match exactly (:mod:`cbmir.evaluation.labels`);
* **leave-one-out**: when the query split is the database split, each query's own point (by point
  id, never by score) is left out of its results, so a query cannot retrieve itself;
* warnings (:mod:`cbmir.search.diagnostics`): all-zero query vectors and a collapsed database.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from cbmir.core.errors import CbmirError
from cbmir.core.splits import SPLITS
from cbmir.evaluation.labels import UNLABELLED, check_single_label
from cbmir.evaluation.metrics import per_query_metrics, retrieval_metrics
from cbmir.search.diagnostics import collapse_warning, zero_query_warning, zero_rows
from cbmir.search.schema import point_id
from cbmir.search.store import SearchResult, VectorStore


@dataclass
class Evaluation:
    """Result of :func:`evaluate_collection`.

    Attributes:
        metrics: ``mAP@k``, ``mMV@k``, ``ACC@1``, ``ACC@3``, ``ACC@k`` as fractions in [0, 1], means over
            the ``n_queries`` labelled queries.
        per_query: per-query outcomes (float64 ``(Q,)`` each) for statistics.
        n_queries: labelled queries scored (Q); n_database: database points searched, unlabelled included.
        query_indices: int64 ``(Q,)`` query rows; query_labels int64 ``(Q,)`` (all >= 0).
        topk_indices: int64 ``(Q, k)`` database rows; topk_labels ``(Q, k)`` (-1 = unlabelled);
            topk_scores float32 ``(Q, k)``.
        timings: ``search_s`` (all queries, batched; excludes the latency sample), ``latency_p50_ms`` /
            ``latency_p95_ms`` (single-query latency over a sample; NaN when ``latency_sample=0``),
            ``fetch_s`` (reading points back: payloads, query vectors, and for the ``blas`` backend the
            database vectors), ``diagnostics_s`` (the collapse check).
        search_backend: ``store`` (the engine's exact queries) or ``blas`` (:mod:`cbmir.search.blas`).
        majority_class_rate: ACC@1 of always answering the majority class of the labelled database
            points, computed on the labelled queries — the floor any model should beat.
        query_split, database_split: the splits; ``leave_one_out``: True when they are the same split,
            so each query's own point was left out of its results.
        n_unlabelled_queries: query points with label -1, not scored (not in ``n_queries``).
        n_unlabelled_database: database points with label -1 (searched, never relevant).
        label_task: the collection's label task (``binary-class``, ``multi-class``,
            ``ordinal-regression`` ..., ``""`` when not recorded), see :mod:`cbmir.evaluation.labels`.
        warnings: one-line warnings (all-zero query vectors, a collapsed database), possibly empty.
    """

    collection: str
    engine: str
    distance: str
    k: int
    n_queries: int
    n_database: int
    metrics: dict[str, float]
    per_query: dict[str, np.ndarray]
    query_indices: np.ndarray
    query_labels: np.ndarray
    topk_indices: np.ndarray
    topk_labels: np.ndarray
    topk_scores: np.ndarray
    majority_class_rate: float
    timings: dict[str, float] = field(default_factory=dict)
    search_backend: str = "store"
    query_split: str = "test"
    database_split: str = "train"
    leave_one_out: bool = False
    n_unlabelled_queries: int = 0
    n_unlabelled_database: int = 0
    label_task: str = ""
    warnings: list[str] = field(default_factory=list)


SEARCH_BACKENDS = ("store", "blas")


def _without_self(res: SearchResult, own_ids: np.ndarray, k: int) -> SearchResult:
    """Leave-one-out: from top-``(k+1)`` results, drop each query's own point (by point id) or, when it
    is not among them, the last hit, leaving exactly the top ``k`` of the other points."""
    keep = res.ids != own_ids[:, None]
    keep[keep.all(axis=1), -1] = False
    shape = (len(own_ids), k)
    return SearchResult(ids=res.ids[keep].reshape(shape), indices=res.indices[keep].reshape(shape),
                        scores=res.scores[keep].reshape(shape))


def _labels(payloads: list[dict]) -> np.ndarray:
    return np.asarray([p["label"] for p in payloads], dtype=np.int64)


def evaluate_collection(store: VectorStore, name: str, *, k: int = 5, batch_size: int = 256,
                        latency_sample: int = 50, database_split: str = "train", query_split: str = "test",
                        progress: bool = True, search_backend: str = "store",
                        check_collapse: bool = True) -> Evaluation:
    """Query every labelled ``query_split`` point against the ``database_split`` points of collection ``name``.

    Label rules (:mod:`cbmir.evaluation.labels`): unlabelled queries are left out and counted,
    unlabelled database points are searched but never relevant, multi-label collections are refused.
    When ``query_split == database_split`` the evaluation is leave-one-out: each query's own point is
    excluded from its results (by point id), so ``k`` must be below the split's size.

    Args:
        batch_size: queries per batched exact search call.
        latency_sample: queries timed one by one afterwards for the latency percentiles (0: none).
        search_backend: ``store`` (the engine's exact batched queries) or ``blas`` (the cross-check:
            :mod:`cbmir.search.blas`, blocked sgemm over the vectors read back from the store; same results).
        check_collapse: run the sampled collapse check of the database
            (:func:`cbmir.search.diagnostics.collapse_warning`).

    Raises:
        CbmirError: an unknown split, the collection is missing or multi-label, a split is empty, there is no labelled
            query or database point, ``k`` leaves no result after leaving each query out, or an unknown
            ``search_backend``.
    """
    if search_backend not in SEARCH_BACKENDS:
        raise CbmirError(f"unknown search backend {search_backend!r}; valid: {', '.join(SEARCH_BACKENDS)}")
    for what, sp in (("query", query_split), ("database", database_split)):
        if sp not in SPLITS:
            raise CbmirError(f"unknown {what} split {sp!r}; valid: {', '.join(SPLITS)}")
    meta = store.meta(name)
    task = check_single_label(meta, name)
    loo = query_split == database_split
    t0 = time.perf_counter()
    blas_index = None
    if search_backend == "blas":
        from cbmir.search.blas import BlasIndex

        blas_index = BlasIndex.from_store(store, name, database_split)
        db_idx, db_pay = blas_index.indices, blas_index.payloads
    else:
        db_idx, _, db_pay = store.fetch(name, database_split, with_vectors=False)
    q_idx, q_vec, q_pay = store.fetch(name, query_split, with_vectors=True)
    fetch_s = time.perf_counter() - t0
    if len(db_idx) == 0 or len(q_idx) == 0:
        raise CbmirError(f"collection {name!r} has {len(db_idx)} {database_split} and {len(q_idx)} {query_split} "
                         "points; ingest both splits first (`cbmir ingest`)")
    # database rows -> labels by sorted lookup: archive rows are 40-bit key hashes, not positions
    order = np.argsort(db_idx, kind="stable")
    db_rows = np.asarray(db_idx, dtype=np.int64)[order]
    db_labels = _labels(db_pay)[order]
    q_all_labels = _labels(q_pay)
    labelled = q_all_labels != UNLABELLED
    n_unl_q, n_unl_db = int((~labelled).sum()), int((db_labels == UNLABELLED).sum())
    if n_unl_db == len(db_idx) or not labelled.any():
        raise CbmirError(
            f"collection {name!r}: {n_unl_q} of {len(q_idx)} {query_split} (query) points and {n_unl_db} of "
            f"{len(db_idx)} {database_split} (database) points are unlabelled (label -1); evaluation needs "
            "labelled queries and a labelled database (relevance = same class). Give labels by class "
            "sub-folders or a manifest 'label' column; search still works (`cbmir search`).")
    q_idx, q_vec, q_labels = q_idx[labelled], q_vec[labelled], q_all_labels[labelled]
    if loo and k >= len(db_idx):
        raise CbmirError(f"k={k}: leave-one-out over split {database_split!r} ({len(db_idx)} points) leaves "
                         f"{len(db_idx) - 1} candidates per query; give k between 1 and {len(db_idx) - 1}")
    own_ids = (np.int64(point_id(query_split, 0)) | q_idx).astype(np.int64)
    kk = k + 1 if loo else k  # leave-one-out: one more, then the query's own point is dropped

    def search(vectors: np.ndarray) -> SearchResult:
        if blas_index is not None:
            return blas_index.search(vectors, kk)
        return store.search(name, vectors, kk, split=database_split, exact=True)

    t0 = time.perf_counter()
    idx_parts, score_parts = [], []
    bar = tqdm(total=len(q_idx), desc=f"{name} [search]", unit="q", disable=not progress, leave=False)
    bs = len(q_idx) if blas_index is not None else batch_size  # blas: blocked internally
    for s in range(0, len(q_idx), bs):
        res = search(q_vec[s:s + bs])
        if loo:
            res = _without_self(res, own_ids[s:s + bs], k)
        idx_parts.append(res.indices)
        score_parts.append(res.scores)
        bar.update(len(res.indices))
    bar.close()
    search_s = time.perf_counter() - t0
    topk_idx = np.concatenate(idx_parts)
    topk_scores = np.concatenate(score_parts)

    lat = []
    for i in np.linspace(0, len(q_idx) - 1, min(max(int(latency_sample), 0), len(q_idx))).astype(int):
        t = time.perf_counter()
        search(q_vec[i])
        lat.append((time.perf_counter() - t) * 1e3)
    p50, p95 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 95))) if lat else (float("nan"),) * 2

    t0 = time.perf_counter()
    warnings = [w for w in (zero_query_warning(q_idx[zero_rows(q_vec)], len(q_idx), query_split),
                            collapse_warning(store, name, database_split, indices=db_idx) if check_collapse else None)
                if w]
    diagnostics_s = time.perf_counter() - t0

    topk_labels = db_labels[np.searchsorted(db_rows, topk_idx)]
    values, counts = np.unique(db_labels[db_labels != UNLABELLED], return_counts=True)
    majority = values[np.argmax(counts)]
    return Evaluation(
        collection=name, engine=store.engine, distance=meta.distance, k=k, n_queries=len(q_idx),
        n_database=len(db_idx), metrics=retrieval_metrics(q_labels, topk_labels, k),
        per_query=per_query_metrics(q_labels, topk_labels, k), query_indices=q_idx, query_labels=q_labels,
        topk_indices=topk_idx, topk_labels=topk_labels, topk_scores=topk_scores,
        majority_class_rate=float((q_labels == majority).mean()), search_backend=search_backend,
        timings={"fetch_s": fetch_s, "search_s": search_s,
                 "search_per_query_ms": search_s / len(q_idx) * 1e3,
                 "latency_p50_ms": p50, "latency_p95_ms": p95, "diagnostics_s": diagnostics_s},
        query_split=query_split, database_split=database_split, leave_one_out=loo,
        n_unlabelled_queries=n_unl_q, n_unlabelled_database=n_unl_db, label_task=task, warnings=warnings,
    )
