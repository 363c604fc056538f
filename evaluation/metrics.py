"""Retrieval metrics exactly as the study defines them (Mahbod et al. 2025, §2.4; DESIGN.md §2).

For one query with label ``y`` and the labels ``r1..rk`` of its top-k results, in rank order:

* AP@k  = (1/h) Σ_{i: r_i = y} (hits among r_1..r_i)/i, h = hits in the top k; 0 when h = 0.
* MV@k  = 1 if y is among the labels tying for the most votes in r_1..r_k, else 0.
* ACC@k = 1 if y occurs in r_1..r_k, else 0 (hit rate).

The m-prefixed metrics are means over queries. All functions are vectorised over queries.

**Unlabelled rows** (label -1, :data:`cbmir.evaluation.labels.UNLABELLED`): a retrieved label -1 is
never relevant (``r_i = y`` needs ``y >= 0``) and casts no vote in MV@k (the majority is taken over
the labelled hits; a query whose hits are all unlabelled has MV@k = 0). Unlabelled *queries* are not
scored: they must be left out before (:func:`cbmir.evaluation.evaluate.evaluate_collection` does and
counts them); these functions refuse them. Ordinal labels are compared exactly (a grade one step
away is not a match), as the study; multi-label data is refused earlier
(:mod:`cbmir.evaluation.labels`).
"""

from __future__ import annotations

import numpy as np

from cbmir.core.errors import CbmirError


def _check(query_labels: np.ndarray, retrieved_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(query_labels).reshape(-1)
    r = np.asarray(retrieved_labels)
    if r.ndim != 2 or r.shape[0] != y.shape[0]:
        raise CbmirError(f"retrieved labels must have shape (n_queries={y.shape[0]}, k); got {r.shape}")
    if y.size and y.min() < 0:
        bad = np.flatnonzero(y < 0)
        raise CbmirError(f"{len(bad)} query label(s) are negative (unlabelled, -1) at positions {bad[:10].tolist()}: "
                         "unlabelled queries cannot be scored; leave them out first (evaluate_collection does)")
    return y, r


def relevance(query_labels: np.ndarray, retrieved_labels: np.ndarray, k: int) -> np.ndarray:
    """bool ``(Q, k)``: hit ``i`` of query ``q`` is relevant (its label equals the query's; labels >= 0)."""
    y, r = _check(query_labels, retrieved_labels)
    return r[:, :k] == y[:, None]  # y >= 0 (checked), so an unlabelled hit (-1) never matches


def average_precision_at_k(query_labels: np.ndarray, retrieved_labels: np.ndarray, k: int) -> np.ndarray:
    """AP@k per query: float64 ``(Q,)``. ``retrieved_labels`` is ``(Q, >=k)`` in rank order."""
    rel = relevance(query_labels, retrieved_labels, k).astype(np.float64)
    cum = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    h = rel.sum(axis=1)
    s = (rel * cum / ranks).sum(axis=1)
    return np.divide(s, h, out=np.zeros_like(s), where=h > 0)


def majority_vote_at_k(query_labels: np.ndarray, retrieved_labels: np.ndarray, k: int) -> np.ndarray:
    """MV@k per query: float64 ``(Q,)`` of 0/1 — 1 when the query label is among the most-voted labels
    (unlabelled hits cast no vote)."""
    votes_y = relevance(query_labels, retrieved_labels, k).sum(axis=1)
    r = np.asarray(retrieved_labels)[:, :k]
    labelled = r >= 0
    # votes of each labelled position's label (0 at unlabelled positions); their max is the top vote count
    votes = ((r[:, :, None] == r[:, None, :]) & labelled[:, None, :]).sum(axis=2) * labelled
    return (votes_y == votes.max(axis=1, initial=0)).astype(np.float64) * (votes_y > 0)


def hit_at_k(query_labels: np.ndarray, retrieved_labels: np.ndarray, k: int) -> np.ndarray:
    """ACC@k per query: float64 ``(Q,)`` of 0/1 — 1 when the query label occurs in the top k."""
    return relevance(query_labels, retrieved_labels, k).any(axis=1).astype(np.float64)


def per_query_metrics(query_labels: np.ndarray, retrieved_labels: np.ndarray, k: int = 5) -> dict[str, np.ndarray]:
    """Per-query outcomes ``{"AP@k", "MV@k", "ACC@1", "ACC@3", "ACC@k"}`` (each float64 ``(Q,)``)."""
    out = {f"AP@{k}": average_precision_at_k(query_labels, retrieved_labels, k),
           f"MV@{k}": majority_vote_at_k(query_labels, retrieved_labels, k)}
    for kk in sorted({1, 3, k}):
        if kk <= k:
            out[f"ACC@{kk}"] = hit_at_k(query_labels, retrieved_labels, kk)
    return out


def retrieval_metrics(query_labels: np.ndarray, retrieved_labels: np.ndarray, k: int = 5) -> dict[str, float]:
    """The study's metrics as fractions in [0, 1]: ``mAP@k``, ``mMV@k``, ``ACC@1``, ``ACC@3``, ``ACC@k``.

    Args:
        query_labels: int ``(Q,)`` labels of the queries (test split), each >= 0.
        retrieved_labels: int ``(Q, k)`` labels of each query's top-k database images, rank order
            (-1 = unlabelled: never relevant).
        k: cut-off (the study uses 5).

    Raises:
        CbmirError: shapes do not match, or a query label is negative (unlabelled).
    """
    pq = per_query_metrics(query_labels, retrieved_labels, k)
    out = {}
    for key, v in pq.items():
        name = "m" + key if key.startswith(("AP", "MV")) else key
        out[name] = float(v.mean()) if len(v) else float("nan")
    return out
