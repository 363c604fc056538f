"""The evaluation run: every query (test) point against the database (train) points, through the store.

Implements the study's protocol (DESIGN.md §1): zero-shot, train split = database, test split =
queries, top-k by exact search, metrics of :mod:`cbmir.evaluation.metrics`. The search is exact whatever
the collection's search mode: a collection created for approximate serving (HNSW / quantization,
:mod:`cbmir.search.index_config`) is evaluated by exact search (``store.search(..., exact=True)``), so its
metrics are the study's; its approximate recall is measured separately (``cbmir.benchmarks.recall``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from cbmir.evaluation.metrics import per_query_metrics, retrieval_metrics
from cbmir.core.errors import CbmirError
from cbmir.search.store import VectorStore


@dataclass
class Evaluation:
    """Result of :func:`evaluate_collection`.

    Attributes:
        metrics: ``mAP@k``, ``mMV@k``, ``ACC@1``, ``ACC@3``, ``ACC@k`` as fractions in [0, 1].
        per_query: per-query outcomes (float64 ``(Q,)`` each) for statistics.
        query_indices: int64 ``(Q,)`` test rows; query_labels int64 ``(Q,)``.
        topk_indices: int64 ``(Q, k)`` database rows; topk_labels ``(Q, k)``; topk_scores float32 ``(Q, k)``.
        timings: ``search_s`` (all queries, batched; excludes the latency sample), ``latency_p50_ms`` /
            ``latency_p95_ms`` (single-query latency over a sample; NaN when ``latency_sample=0``),
            ``fetch_s`` (reading points back: payloads, query vectors, and for the ``blas`` backend the
            database vectors).
        search_backend: ``store`` (the engine's exact queries) or ``blas`` (:mod:`cbmir.search.blas`).
        majority_class_rate: ACC@1 of always answering the majority class of the database, computed on
            the queries — the floor any model should beat.
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


SEARCH_BACKENDS = ("store", "blas")


def evaluate_collection(store: VectorStore, name: str, *, k: int = 5, batch_size: int = 256,
                        latency_sample: int = 50, database_split: str = "train", query_split: str = "test",
                        progress: bool = True, search_backend: str = "store") -> Evaluation:
    """Query every ``query_split`` point against the ``database_split`` points of collection ``name``.

    Args:
        batch_size: queries per batched exact search call.
        latency_sample: queries timed one by one afterwards for the latency percentiles (0: none).
        search_backend: ``store`` (the engine's exact batched queries) or ``blas`` (the cross-check:
            :mod:`cbmir.search.blas`, blocked sgemm over the vectors read back from the store; same results).

    Raises:
        CbmirError: the collection is missing, a split is empty, or an unknown ``search_backend``.
    """
    if search_backend not in SEARCH_BACKENDS:
        raise CbmirError(f"unknown search backend {search_backend!r}; valid: {', '.join(SEARCH_BACKENDS)}")
    meta = store.meta(name)
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
    db_labels_by_row = np.full(int(db_idx.max()) + 1, -1, dtype=np.int64)
    db_labels_by_row[db_idx] = [p["label"] for p in db_pay]
    q_labels = np.asarray([p["label"] for p in q_pay], dtype=np.int64)

    t0 = time.perf_counter()
    idx_parts, score_parts = [], []
    bar = tqdm(total=len(q_idx), desc=f"{name} [search]", unit="q", disable=not progress, leave=False)
    bs = len(q_idx) if blas_index is not None else batch_size  # blas: blocked internally
    for s in range(0, len(q_idx), bs):
        if blas_index is not None:
            res = blas_index.search(q_vec[s:s + bs], k)
        else:
            res = store.search(name, q_vec[s:s + bs], k, split=database_split, exact=True)
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
        if blas_index is not None:
            blas_index.search(q_vec[i], k)
        else:
            store.search(name, q_vec[i], k, split=database_split, exact=True)
        lat.append((time.perf_counter() - t) * 1e3)
    p50, p95 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 95))) if lat else (float("nan"),) * 2

    topk_labels = db_labels_by_row[topk_idx]
    values, counts = np.unique(db_labels_by_row[db_idx], return_counts=True)
    majority = values[np.argmax(counts)]
    return Evaluation(
        collection=name, engine=store.engine, distance=meta.distance, k=k, n_queries=len(q_idx),
        n_database=len(db_idx), metrics=retrieval_metrics(q_labels, topk_labels, k),
        per_query=per_query_metrics(q_labels, topk_labels, k), query_indices=q_idx, query_labels=q_labels,
        topk_indices=topk_idx, topk_labels=topk_labels, topk_scores=topk_scores,
        majority_class_rate=float((q_labels == majority).mean()), search_backend=search_backend,
        timings={"fetch_s": fetch_s, "search_s": search_s,
                 "search_per_query_ms": search_s / len(q_idx) * 1e3,
                 "latency_p50_ms": p50, "latency_p95_ms": p95},
    )
