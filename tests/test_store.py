"""The store on both engines: exact top-k equals a numpy brute force, ties, idempotent upserts,
metadata checks, chunked layout for vectors above 65,535 dims."""

import numpy as np
import pytest

from cbmir.core.errors import CbmirError
from cbmir.search.schema import CollectionMeta, chunk_layout, collection_name, make_payload, point_id, split_and_index


def brute_force_cosine(q, db, k):
    """Independent reference: float64 cosine, ties by lower index (stable sort)."""
    qn = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    dn = db.astype(np.float64) / np.linalg.norm(db, axis=1, keepdims=True)
    sim = qn @ dn.T
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sim, order, 1)


def fill(store, name, db, q, labels_db=None, dim=None, model="m"):
    meta = CollectionMeta(dataset="toy", size=28, model=model, backend="numpy", dim=dim or db.shape[1])
    store.ensure_collection(name, meta)
    labels_db = np.zeros(len(db), int) if labels_db is None else labels_db
    for split, x, labs in (("train", db, labels_db), ("test", q, np.zeros(len(q), int))):
        pays = [make_payload(dataset="toy", split=split, index=i, label=int(labs[i]), model=model, size=28,
                             image_id=f"toy/{split}/{i}") for i in range(len(x))]
        store.upsert(name, split, list(range(len(x))), x, pays)
    return meta


def assert_same_ranking(res, ref_idx, ref_scores, tol=1e-5):
    """Equal rankings; where positions differ the two candidates' scores must tie within float error."""
    np.testing.assert_allclose(res.scores, ref_scores, atol=tol)
    diff = res.indices != ref_idx
    assert diff.sum() <= max(1, int(0.001 * diff.size)), f"{diff.sum()} positions differ"


def test_schema_ids_roundtrip_and_names():
    for split in ("train", "val", "test"):
        for i in (0, 1, 12345, 89_995):
            assert split_and_index(point_id(split, i)) == (split, i)
    assert point_id("train", 3) < point_id("train", 4) < point_id("test", 0)
    assert collection_name("breastmnist", 28, "hog") == "breastmnist_28_hog"
    assert collection_name("breastmnist", 28, "resnet50", backend="keras") == "breastmnist_28_resnet50_keras"
    assert collection_name("breastmnist", 28, "resnet50", backend="keras", distance="euclidean",
                           random_init=True) == "breastmnist_28_resnet50_keras_euclidean_randinit"
    with pytest.raises(CbmirError):
        point_id("validation", 0)


def test_chunk_layout_covers_dim():
    for dim in (1, 512, 65_535, 65_536, 131_072):
        lay = chunk_layout(dim)
        assert lay[0][1] == 0 and lay[-1][2] == dim
        assert all(b - a <= 65_535 for _, a, b in lay)
        assert all(lay[i][2] == lay[i + 1][1] for i in range(len(lay) - 1))
    assert len(chunk_layout(65_535)) == 1 and len(chunk_layout(65_536)) == 2


def test_topk_equals_brute_force_random(store):
    rng = np.random.default_rng(1)
    db = rng.standard_normal((700, 48)).astype(np.float32)
    q = rng.standard_normal((40, 48)).astype(np.float32)
    fill(store, "toy_28_m", db, q)
    res = store.search("toy_28_m", q, 5)
    ref_idx, ref_s = brute_force_cosine(q, db, 5)
    assert_same_ranking(res, ref_idx, ref_s)
    assert store.count("toy_28_m", "train") == 700 and store.count("toy_28_m", "test") == 40


def test_ties_broken_by_lower_index(store):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((5, 16)).astype(np.float32)
    db = np.repeat(base, 30, axis=0)  # 30 identical copies of each of 5 vectors; rows 0..29 tie, ...
    perm = rng.permutation(len(db))
    db = db[perm]
    q = base[:3] * 2.0
    fill(store, "ties", db, q)
    res = store.search("ties", q, 12)
    for j in range(3):
        tied = np.flatnonzero((db == base[j]).all(axis=1))
        np.testing.assert_array_equal(res.indices[j], tied[:12])  # lowest database indices first


def test_reingest_keeps_point_count_and_overwrites(store):
    rng = np.random.default_rng(3)
    db = rng.standard_normal((100, 8)).astype(np.float32)
    q = rng.standard_normal((10, 8)).astype(np.float32)
    fill(store, "re", db, q)
    db2 = rng.standard_normal((100, 8)).astype(np.float32)
    fill(store, "re", db2, q)
    assert store.count("re") == 110
    _, vec, _ = store.fetch("re", "train")
    np.testing.assert_allclose(vec, db2 / np.linalg.norm(db2, axis=1, keepdims=True), atol=1e-6)


def test_model_or_dim_mismatch_refused(store):
    rng = np.random.default_rng(4)
    fill(store, "mm", rng.standard_normal((10, 8)).astype(np.float32), rng.standard_normal((2, 8)).astype(np.float32))
    with pytest.raises(CbmirError, match="model"):
        store.ensure_collection("mm", CollectionMeta(dataset="toy", size=28, model="other", backend="numpy", dim=8))
    with pytest.raises(CbmirError, match="dim"):
        store.ensure_collection("mm", CollectionMeta(dataset="toy", size=28, model="m", backend="numpy", dim=9))
    assert store.count("mm") == 12  # nothing lost
    store.ensure_collection("mm", CollectionMeta(dataset="toy", size=28, model="other", backend="numpy", dim=8),
                            recreate=True)
    assert store.count("mm") == 0


def test_wrong_vector_shape_and_nan_refused(store):
    rng = np.random.default_rng(5)
    fill(store, "bad", rng.standard_normal((10, 8)).astype(np.float32), rng.standard_normal((2, 8)).astype(np.float32))
    with pytest.raises(CbmirError, match=r"\(n, 8\)"):
        store.search("bad", np.zeros((1, 7), np.float32), 3)
    x = np.ones((1, 8), np.float32)
    x[0, 3] = np.nan
    pay = [make_payload(dataset="toy", split="train", index=0, label=0, model="m", size=28, image_id="x")]
    with pytest.raises(CbmirError, match="NaN"):
        store.upsert("bad", "train", [0], x, pay)


def test_chunked_vectors_equal_full_cosine(store):
    rng = np.random.default_rng(6)
    dim = 70_000  # above Qdrant's 65,535 limit -> two chunks
    db = rng.standard_normal((60, dim)).astype(np.float32)
    q = rng.standard_normal((4, dim)).astype(np.float32)
    meta = fill(store, "big", db, q)
    assert len(meta.layout) == 2
    res = store.search("big", q, 5)
    ref_idx, ref_s = brute_force_cosine(q, db, 5)
    np.testing.assert_array_equal(res.indices, ref_idx)
    np.testing.assert_allclose(res.scores, ref_s, atol=1e-5)


def test_get_points_and_exclude_self(store):
    rng = np.random.default_rng(7)
    db = rng.standard_normal((50, 8)).astype(np.float32)
    fill(store, "pt", db, db[:3])
    vec, pays = store.get_points("pt", "train", [5])
    assert pays[0]["index"] == 5 and pays[0]["split"] == "train"
    res = store.search("pt", vec, 3, exclude_ids=[[point_id("train", 5)]])
    assert 5 not in res.indices[0]
    with pytest.raises(CbmirError, match="no train point"):
        store.get_points("pt", "train", [999])


def test_missing_collection_is_clear(store):
    with pytest.raises(CbmirError, match="does not exist"):
        store.search("nope", np.zeros((1, 4), np.float32), 1)
