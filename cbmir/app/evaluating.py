"""Evaluate: every query-split point against the database split, the study's metrics (DESIGN.md §2)."""

from __future__ import annotations

from cbmir.core.errors import CbmirError


def check_k(k) -> int:
    """``k`` must be an integer >= 1 (checked before any work; the database bound is checked later)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CbmirError(f"--k {k}: must be an integer >= 1 (at most the number of database points)")
    return k


def evaluate(app, name: str, *, k: int = 5, search_backend: str = "store", progress: bool = True,
             latency_sample: int = 50, query_split: str = "test", database_split: str = "train"):
    """Query every ``query_split`` point of collection ``name`` against its ``database_split`` points (the
    study's protocol: test against train). Equal splits: leave-one-out (each query's own point excluded).
    The search is exact even when the collection was created for approximate search (its HNSW /
    quantization is bypassed).

    Returns:
        ``(evaluation, notes)``: :class:`cbmir.evaluation.evaluate.Evaluation` (metrics as fractions in
        [0, 1]) and one-line notes for the user (e.g. skipped unreadable archive files).

    Raises:
        CbmirError: an unfinished, query-less or unlabelled collection
            (:func:`cbmir.ingest.sources.check_evaluable`); ``k`` above the database size; an unknown
            search backend.
    """
    from cbmir.evaluation.evaluate import SEARCH_BACKENDS, evaluate_collection
    from cbmir.ingest.sources import check_evaluable

    check_k(k)
    if search_backend not in SEARCH_BACKENDS:
        raise CbmirError(f"unknown --search-backend {search_backend!r}; valid: {', '.join(SEARCH_BACKENDS)}")
    store = app.store
    notes = check_evaluable(store, name, database_split=database_split, query_split=query_split)
    n = store.count(name, database_split)
    if n and k > n:
        raise CbmirError(f"--k {k} is larger than the database of collection {name!r} ({n} {database_split} "
                         f"points): give --k between 1 and {n}")
    ev = evaluate_collection(store, name, k=k, search_backend=search_backend, progress=progress,
                             latency_sample=latency_sample, query_split=query_split,
                             database_split=database_split)
    return ev, notes


def result_dict(ev, meta, report=None, ingest_total_s: float | None = None) -> dict:
    """The JSON record of one evaluation (``cbmir run/evaluate -o``): configuration, metrics, the majority-class
    rate, timings, and every query's top-k (``per_query``) so that any metric can be recomputed
    (``python -m cbmir.benchmarks.check_bruteforce``).

    Units (the README section "Metrics"): ``metrics`` and ``majority_class_rate`` are fractions in [0, 1]
    (``"metrics_unit": "fraction"``, as in code); ``metrics_percent`` and ``majority_class_rate_percent`` are the
    same values in percent, as printed; timing keys end in ``_s`` (seconds) or ``_ms`` (milliseconds)."""
    from cbmir.ingest.extractors import get_spec

    rep = report
    return {
        "collection": ev.collection, "engine": ev.engine, "distance": ev.distance, "k": ev.k,
        "search_backend": getattr(ev, "search_backend", "store"),
        # the study's protocol searches exactly, whatever the collection's serving mode (index_mode)
        "search_mode": "exact", "index_mode": meta.index_config().name,
        "dataset": meta.dataset, "size": meta.size, "model": meta.model, "backend": meta.backend,
        "dim": meta.dim, "weights": meta.weights, "random_init": meta.random_init,
        "family": "handcrafted baseline" if get_spec(meta.model).baseline else None,
        "n_queries": ev.n_queries, "n_database": ev.n_database,
        "query_split": ev.query_split, "database_split": ev.database_split, "leave_one_out": ev.leave_one_out,
        "n_unlabelled_queries": ev.n_unlabelled_queries, "n_unlabelled_database": ev.n_unlabelled_database,
        "metrics_unit": "fraction", "metrics": ev.metrics,
        "metrics_percent": {m: 100.0 * float(v) for m, v in ev.metrics.items()},
        "majority_class_rate": ev.majority_class_rate,
        "majority_class_rate_percent": 100.0 * float(ev.majority_class_rate), "warnings": ev.warnings,
        "timings": {
            "database_creation_s": _split_seconds(rep, meta, "train"),
            "query_extraction_s": _split_seconds(rep, meta, "test"),
            "ingest_total_s": ingest_total_s,
            "slices_per_s": rep.extra.get("slices_per_s") if rep else None,
            **ev.timings,
        },
        "reused_splits": rep.skipped if rep else None,
        # rows already stored before this run, per split: its timings cover only the rest (0: a fresh run)
        "resumed_from": {sp: int(n) for sp, n in rep.resumed_from.items() if sp not in rep.skipped} if rep else None,
        "skipped_files": rep.extra.get("skipped_files") if rep else None,
        "per_query": {"query_indices": ev.query_indices.tolist(), "query_labels": ev.query_labels.tolist(),
                      "topk_indices": ev.topk_indices.tolist(),
                      "topk_scores": [[float(x) for x in row] for row in ev.topk_scores]},
    }


def _split_seconds(report, meta, split: str) -> float | None:
    """Seconds to embed and upsert ``split``: measured by this run, or, for a split this run reused, the time
    recorded in the collection metadata when it was built (``extra["ingest_timings"]``, None if unknown)."""
    if report is None:
        return None
    if split in report.skipped:
        from cbmir.ingest.job import TIMINGS_KEY

        rec = ((meta.extra or {}).get(TIMINGS_KEY) or {}).get(split)
        return float(rec["seconds"]) if rec else None
    return float(report.seconds.get(split, 0.0))
