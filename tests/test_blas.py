"""The BLAS cross-check path (search/blas.py): exact top-k, ties by lower index, equal to the store."""

from __future__ import annotations

import numpy as np
import pytest

from cbmir.core.errors import CbmirError
from cbmir.search.blas import BlasIndex, blas_search, exact_topk


def _naive(q: np.ndarray, x: np.ndarray, k: int, distance: str):
    """Brute force, one float64 score per (query, row), ranked by (score, row) - no BLAS."""
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    if distance == "cosine":
        def unit(a):  # float64 normalisation of float32-stored unit vectors (the store's layout)
            n = np.sqrt((a * a).sum(axis=1, keepdims=True))
            a = (a / np.where(n > 0, n, 1.0)).astype(np.float32).astype(np.float64)
            n = np.sqrt((a * a).sum(axis=1, keepdims=True))
            return a / np.where(n > 0, n, 1.0)
        q64, x64 = unit(q64), unit(x64)
        s = (q64[:, None, :] * x64[None, :, :]).sum(axis=2)
    else:
        s = -((q64[:, None, :] - x64[None, :, :]) ** 2).sum(axis=2)
    rows = np.broadcast_to(np.arange(len(x)), s.shape)
    order = np.lexsort((rows, -s), axis=-1)[:, :k]
    best = np.take_along_axis(s, order, axis=1)
    return order, (best if distance == "cosine" else np.sqrt(-best))


def _with_ties(rng, n, d, nq, n_copies=12):
    """Random vectors with exact duplicates spread over the database, queries equal to some of them,
    and zero vectors: every query's top-k is decided by the tie rule."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    src = rng.choice(n, size=min(6, nq), replace=False)
    for s in src:
        x[rng.choice(n, size=n_copies, replace=False)] = x[s]  # more copies than k + margin
    q[: len(src)] = x[src]
    q[len(src)] = x[src[0]] * 3.0  # same direction, other length: cosine ties, euclidean not
    x[rng.choice(n, size=5, replace=False)] = 0.0
    return q, x


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("block_bytes", [1 << 12, 1 << 16, 32 << 20])
def test_equals_naive_brute_force_with_ties(distance, block_bytes):
    rng = np.random.default_rng(7)
    q, x = _with_ties(rng, n=1500, d=24, nq=40)
    rows, scores = exact_topk(q, x, 5, distance=distance, block_bytes=block_bytes)
    ref_rows, ref_scores = _naive(q, x, 5, distance)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-6)
    assert rows.dtype == np.int64 and scores.dtype == np.float32


def test_tie_rule_lower_index_first():
    x = np.ones((50, 8), dtype=np.float32)  # every row ties with every other
    x[10] = -1.0
    rows, scores = exact_topk(np.ones((2, 8), np.float32), x, 5)
    assert rows.tolist() == [[0, 1, 2, 3, 4]] * 2
    np.testing.assert_allclose(scores, 1.0, rtol=1e-6)
    rows, _ = exact_topk(np.zeros((1, 8), np.float32), x, 3)  # zero query: all scores 0
    assert rows.tolist() == [[0, 1, 2]]
    rows, d = exact_topk(np.full((1, 8), -1.0, np.float32), x, 2, distance="euclidean")
    assert rows.tolist() == [[10, 0]] and d[0, 0] == 0.0


def test_margin_exhausted_falls_back_exactly():
    """More exact ties than the float32 candidate margin: the float64 rounds must still be exact."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x[rng.choice(3000, 200, replace=False)] = x[5]
    q = x[5:6] + np.float32(1e-4) * rng.standard_normal((1, 16)).astype(np.float32)
    for dist in ("cosine", "euclidean"):
        rows, _ = exact_topk(q, x, 5, distance=dist, margin=2, block_bytes=1 << 14)
        np.testing.assert_array_equal(rows, _naive(q, x, 5, dist)[0])


def test_k_clipped_and_errors():
    x = np.eye(3, dtype=np.float32)
    rows, _ = exact_topk(x[:1], x, 10)
    assert rows.shape == (1, 3) and rows[0, 0] == 0
    with pytest.raises(CbmirError, match="unknown distance"):
        exact_topk(x, x, 1, distance="dot")
    with pytest.raises(CbmirError, match="empty"):
        exact_topk(x, np.zeros((0, 3), np.float32), 1)
    with pytest.raises(CbmirError, match="shape"):
        exact_topk(np.ones((1, 4), np.float32), x, 1)
    with pytest.raises(CbmirError, match="NaN"):
        exact_topk(np.full((1, 3), np.nan, np.float32), x, 1)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_equals_edge_store_search(tmp_path, distance):
    from cbmir.evaluation.evaluate import evaluate_collection
    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.schema import CollectionMeta, make_payload

    rng = np.random.default_rng(11)
    n, nq, d = 2500, 120, 48
    store = EdgeStore(tmp_path / "store")
    try:
        meta = CollectionMeta(dataset="synth", size=28, model="synthetic", backend="numpy", dim=d, distance=distance)
        store.ensure_collection("c", meta)
        for split, m in (("train", n), ("test", nq)):
            v = rng.standard_normal((m, d)).astype(np.float32) * rng.uniform(0.5, 3.0, (m, 1)).astype(np.float32)
            pays = [make_payload(dataset="synth", split=split, index=i, label=i % 3, model="synthetic", size=28,
                                 image_id=f"{split}/{i}") for i in range(m)]
            store.upsert("c", split, list(range(m)), v, pays)
        _, q, _ = store.fetch("c", "test")
        ref = store.search("c", q, 5)
        got = blas_search(store, "c", q, 5)
        np.testing.assert_array_equal(got.indices, ref.indices)
        np.testing.assert_array_equal(got.ids, ref.ids)
        np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4, atol=1e-5)

        idx = BlasIndex.from_store(store, "c")
        assert idx.vectors.shape == (n, d) and idx.indices.tolist() == list(range(n))
        ev_s = evaluate_collection(store, "c", progress=False, latency_sample=0)
        ev_b = evaluate_collection(store, "c", progress=False, latency_sample=2, search_backend="blas")
        np.testing.assert_array_equal(ev_s.topk_indices, ev_b.topk_indices)
        assert ev_s.metrics == ev_b.metrics and ev_b.search_backend == "blas"
        assert np.isnan(ev_s.timings["latency_p50_ms"]) and ev_b.timings["latency_p50_ms"] > 0
        with pytest.raises(CbmirError, match="search backend"):
            evaluate_collection(store, "c", progress=False, search_backend="faiss")
    finally:
        store.close()
