"""3D volumes (issue 4): slice-wise features and exact search beyond Qdrant's 65,535-dim limit.

* the study's volume preprocessing against an independent scipy zoom + PIL bicubic resize;
* slice order, batching and aggregation of :class:`cbmir.ingest.volumes.VolumeEmbedder`;
* 131,072-dim vectors (3 named chunks) on both engines give the numpy brute-force cosine ranking;
* end-to-end ingest + evaluation of real AdrenalMNIST3D volumes with HOG equals brute force.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import Batch, ExtractorSpec
from cbmir.ingest.embedder import make_embedder
from cbmir.ingest.volumes import (
    VolumeEmbedder,
    aggregate,
    preprocess_volumes,
    raw_slice_extractor,
    resize_slices,
    slice_side,
    zoom_depth,
)
from cbmir.search.schema import MAX_VECTOR_DIM, CollectionMeta, make_payload

rng = np.random.default_rng(4)


# ----------------------------------------------------------------------------- helpers
class FakeExtractor:
    """Deterministic 2D extractor: per-slice [mean, pixel(0,0), pixel(-1,-1), 1]; records calls."""

    def __init__(self, family: str = "handcrafted", dim: int = 4) -> None:
        self.spec = ExtractorSpec(name="fake", family=family, dim=dim, input_policy="own size",
                                  weights_source="none", backends=("numpy",))
        self.calls: list[tuple] = []

    def extract(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
        self.calls.append(images.shape)
        x = images[..., 0].astype(np.float32)
        return np.stack([x.mean(axis=(1, 2)), x[:, 0, 0], x[:, -1, -1], np.ones(len(x), np.float32)], axis=1)

    def identity(self) -> dict:
        return {"model": "fake", "backend": "numpy", "dim": self.spec.dim, "weights": "none",
                "random_init": False, "preprocessing": "fake"}


def smooth_volume(side: int, seed: int = 0) -> np.ndarray:
    """uint8 (side, side, side) smooth-ish volume with the full 0..255 range (tests interpolation)."""
    r = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(r.standard_normal((side, side, side)), 2.0)
    v = (v - v.min()) / (v.max() - v.min()) * 255
    return np.rint(v).astype(np.uint8)


def brute_force(q: np.ndarray, db: np.ndarray, k: int, distance: str = "cosine"):
    """Independent float64 reference: top-k rows and scores, ties by lower index (stable sort)."""
    q64, d64 = q.astype(np.float64), db.astype(np.float64)
    if distance == "cosine":
        s = (q64 / np.linalg.norm(q64, axis=1, keepdims=True)) @ (d64 / np.linalg.norm(d64, axis=1, keepdims=True)).T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = np.sqrt(((q64[:, None, :] - d64[None]) ** 2).sum(-1))
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, 1)


def fill(store, name, meta, db, q):
    store.ensure_collection(name, meta)
    for split, x in (("train", db), ("test", q)):
        pays = [make_payload(dataset=meta.dataset, split=split, index=i, label=i % 2, model=meta.model,
                             size=meta.size, image_id=f"{split}/{i}") for i in range(len(x))]
        store.upsert(name, split, list(range(len(x))), x, pays)


# ----------------------------------------------------------------------------- preprocessing
def test_zoom_depth_equals_scipy_cubic_zoom_on_uint8():
    vols = np.stack([smooth_volume(28, 1), rng.integers(0, 256, (28, 28, 28), dtype=np.uint8)])
    out = zoom_depth(vols, 32)
    assert out.shape == (2, 32, 28, 28) and out.dtype == np.uint8
    for i in range(2):  # scipy on a uint8 volume: rounded and clipped, the same rule
        np.testing.assert_array_equal(out[i], ndimage.zoom(vols[i], (32 / 28, 1, 1), order=3))
    np.testing.assert_array_equal(out[:, 0], vols[:, 0])  # grid_mode=False: end slices map onto themselves
    np.testing.assert_array_equal(out[:, -1], vols[:, -1])
    assert zoom_depth(vols, 28) is vols


def test_zoom_depth_equals_scipy_on_real_adrenal_volumes(data_dir):
    """The matrix form of the depth zoom gives scipy's uint8 output voxel for voxel on real data."""
    z = np.load(data_dir / "adrenalmnist3d.npz")
    vols = np.concatenate([z["train_images"][:48], z["test_images"][:16]])
    out = zoom_depth(vols, 32)
    ref = np.stack([ndimage.zoom(v, (32 / 28, 1, 1), order=3) for v in vols])
    np.testing.assert_array_equal(out, ref)


def test_preprocessing_matches_independent_scipy_zoom_and_pil_bicubic():
    """Reference: scipy cubic zoom along depth (uint8), then PIL bicubic per slice.

    Tolerance: against PIL's float ("F") resize rounded once, at most 1 grey level on at most 0.5 %
    of voxels (rounding of exact .5 cases; 0 here); against PIL's 8-bit resize, which rounds between
    its horizontal and vertical passes, at most 1 grey level.
    """
    vol = smooth_volume(28, 2)
    ours = preprocess_volumes(vol[None], 32)[0]
    assert ours.shape == (32, 32, 32) and ours.dtype == np.uint8
    z = ndimage.zoom(vol, (32 / 28, 1, 1), order=3)
    ref_f = np.stack([np.asarray(Image.fromarray(s.astype(np.float32), mode="F").resize((32, 32), Image.BICUBIC))
                      for s in z])
    ref = np.clip(np.rint(ref_f), 0, 255)
    diff = np.abs(ours.astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, (diff.max(), (diff > 0).mean())
    ref8 = np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.BICUBIC)) for s in z])
    assert np.abs(ours.astype(int) - ref8.astype(int)).max() <= 1
    # the reference itself is not trivial: it differs from nearest-neighbour resampling
    nearest = np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.NEAREST)) for s in z])
    assert np.abs(nearest.astype(int) - ref.astype(int)).max() > 5
    # t == s (HOG, CNNs at 64): no resampling at all
    v64 = smooth_volume(64, 3)[None]
    assert preprocess_volumes(v64, 64) is v64
    assert resize_slices(v64, 64) is v64


def test_slice_side_rule():
    assert slice_side(FakeExtractor("imagenet-cnn"), 28) == 32  # CNNs upsample 28 -> 32
    assert slice_side(FakeExtractor("imagenet-cnn"), 64) == 64
    assert slice_side(FakeExtractor("handcrafted"), 28) == 28  # HOG: slices at their own size
    assert slice_side(FakeExtractor("foundation"), 28) == 28  # own preprocessing resizes to 224
    ex = FakeExtractor("foundation")
    ex.min_side = 40
    assert slice_side(ex, 28) == 40


# ----------------------------------------------------------------------------- embedder
def test_slice_order_batching_and_concat_equals_per_slice_extraction():
    ex = FakeExtractor()
    emb = VolumeEmbedder(ex, size=28, slice_batch=20)
    vols = rng.integers(0, 256, (3, 28, 28, 28), dtype=np.uint8)
    v = emb.embed(vols)
    assert v.shape == (3, 28 * 4) == (3, emb.dim) and v.dtype == np.float32 and emb.slices == 28
    # batched over volumes: 84 slices in calls of 20 (the last 4), never one slice per call
    assert [c[0] for c in ex.calls] == [20, 20, 20, 20, 4]
    # concat = per-slice extraction concatenated in slice order
    per = np.concatenate([np.concatenate([ex.extract(np.repeat(vols[i, j][None, ..., None], 3, -1))[0]
                                          for j in range(28)])[None] for i in range(3)])
    np.testing.assert_array_equal(v, per)
    # permuting the slices of a volume changes its vector (order is kept, not pooled away)
    perm = rng.permutation(28)
    vp = emb.embed(vols[:1, perm])
    assert not np.allclose(vp[0], v[0])
    np.testing.assert_array_equal(vp[0].reshape(28, 4), v[0].reshape(28, 4)[perm])


def test_hog_concat_equals_per_slice_hog(data_dir):
    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.medmnist_data import open_medmnist

    vols = next(open_medmnist("adrenalmnist3d", 28, data_dir).iter_batches("train", 2)).images
    emb = make_embedder(create_extractor("hog"), size=28, is_3d=True)
    assert (emb.slices, emb.slice_dim, emb.dim) == (28, 1296, 36_288)
    v = emb.embed(vols)
    # independent: skimage's raw HOG of each depth slice (no per-slice L2 normalisation, as the study
    # concatenated it; normalising each slice gives AdrenalMNIST3D 28 ACC@1 69.13 instead of 71.14)
    from skimage.feature import hog

    from cbmir.ingest.extractors.hog import HOG_PARAMS

    per = np.stack([np.concatenate([hog(vols[i, j] / 255.0, feature_vector=True, **HOG_PARAMS)
                                    for j in range(28)]) for i in range(2)])
    np.testing.assert_allclose(v, per, rtol=0, atol=1e-6)
    assert not np.allclose(emb.embed(vols[:1, ::-1])[0], v[0])
    assert "28^3" in emb.identity()["preprocessing"] and emb.identity()["dim"] == 36_288


def test_cnn_at_28_uses_32_slices_of_32px_and_65536_dims():
    from cbmir.ingest.extractors import create_extractor

    ex = create_extractor("resnet50", random_init=True, device="cpu", batch_size=64)
    emb = VolumeEmbedder(ex, size=28)
    assert (emb.slices, emb.dim) == (32, 65_536)
    seen = []
    orig = ex.extract
    ex.extract = lambda x: (seen.append(x.shape), orig(x))[1]
    vols = np.stack([smooth_volume(28, 5), smooth_volume(28, 6)])
    v = emb.embed(vols)
    assert v.shape == (2, 65_536) and seen == [(64, 32, 32, 3)]  # 2 volumes x 32 slices, one call
    one = np.concatenate([orig(s[None]) for s in emb.preprocess(vols[:1])[:8]], axis=1)[0]
    np.testing.assert_allclose(v[0, :8 * 2048], one, rtol=1e-3, atol=1e-4)  # batched == one slice per call
    ident = emb.identity()
    assert ident["slices"] == 32 and ident["aggregation"] == "concat" and "28->32" in ident["preprocessing"]


def test_mean_max_aggregation_dims_and_values():
    ex = FakeExtractor()
    vols = rng.integers(0, 256, (2, 28, 28, 28), dtype=np.uint8)
    cat = VolumeEmbedder(ex, size=28).embed(vols).reshape(2, 28, 4)
    for agg, ref in (("mean", cat.mean(axis=1)), ("max", cat.max(axis=1))):
        emb = make_embedder(ex, size=28, is_3d=True, aggregation=agg)
        assert emb.aggregation == agg and emb.dim == 4 and emb.is_3d
        np.testing.assert_allclose(emb.embed(vols), ref, rtol=1e-6)
    with pytest.raises(CbmirError, match="aggregation"):
        VolumeEmbedder(ex, size=28, aggregation="sum")
    with pytest.raises(CbmirError, match="aggregation"):
        aggregate(cat.reshape(56, 4), 2, "median")


def test_2d_images_given_to_a_3d_embedder_are_refused():
    emb = VolumeEmbedder(FakeExtractor(), size=28)
    for bad in (np.zeros((4, 28, 28, 1), np.uint8), np.zeros((4, 28, 28, 3), np.uint8)):
        with pytest.raises(CbmirError, match="2D images"):
            emb.embed(bad)
    with pytest.raises(CbmirError, match="single volume"):
        emb.embed(np.zeros((28, 28, 28), np.uint8))
    with pytest.raises(CbmirError, match="uint8"):
        emb.embed(np.zeros((1, 28, 28, 28), np.float32))
    with pytest.raises(CbmirError, match=r"\(B, D, 28, 28\)"):
        emb.embed(np.zeros((1, 64, 64, 64), np.uint8))


def test_per_slice_l2_normalisation_is_switched_off_on_a_copy():
    ex = FakeExtractor()
    ex.l2_normalize = True
    emb = VolumeEmbedder(ex, size=28)
    assert emb.extractor is not ex and emb.extractor.l2_normalize is False and ex.l2_normalize is True
    assert emb.raw_slices and "normalisation off" in emb.identity()["preprocessing"]
    plain = FakeExtractor()
    assert raw_slice_extractor(plain) is plain


# ----------------------------------------------------------------------------- exact search > 65,535 dims
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("engine", ["edge", "client"])
def test_131072_dim_search_equals_brute_force(engine, distance, tmp_path):
    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.server_store import ServerStore

    dim, n, nq, k = 131_072, 40, 5, 5
    meta = CollectionMeta(dataset="syn3d", size=64, model="m", backend="numpy", dim=dim, distance=distance,
                          is_3d=True, aggregation="concat")
    base = rng.standard_normal(dim).astype(np.float32)
    db = base + rng.standard_normal((n, dim))
    for _, a, b in meta.layout:  # each chunk its own scale per point: chunks alone rank differently
        db[:, a:b] *= rng.uniform(0.2, 3.0, (n, 1))
    db = db.astype(np.float32)
    q = (base + rng.standard_normal((nq, dim))).astype(np.float32)
    assert len(meta.layout) == 3 and all(b - a <= MAX_VECTOR_DIM for _, a, b in meta.layout)
    store = EdgeStore(tmp_path / "store") if engine == "edge" else ServerStore(location=":memory:")
    try:
        fill(store, "syn3d_64_m", meta, db, q)
        res = store.search("syn3d_64_m", q, k)
        ref_idx, ref_s = brute_force(q, db, k, distance)
        np.testing.assert_array_equal(res.indices, ref_idx)
        np.testing.assert_allclose(res.scores, ref_s, rtol=1e-5, atol=1e-5)
        # the test discriminates: the first chunk alone ranks differently
        a, b = meta.layout[0][1:]
        assert not (brute_force(q[:, a:b], db[:, a:b], k, distance)[0] == ref_idx).all()
        # layout recorded in the collection metadata, vectors read back whole and in row order
        assert store.meta("syn3d_64_m").layout == meta.layout
        idx, vecs, _ = store.fetch("syn3d_64_m", "train")
        expect = db / np.linalg.norm(db, axis=1, keepdims=True) if distance == "cosine" else db
        np.testing.assert_array_equal(idx, np.arange(n))
        np.testing.assert_allclose(vecs, expect, rtol=1e-5, atol=1e-7)
        if engine == "edge":  # reopened from disk
            store.close()
            store = EdgeStore(tmp_path / "store")
            assert store.meta("syn3d_64_m").layout == meta.layout
            np.testing.assert_array_equal(store.search("syn3d_64_m", q, k).indices, ref_idx)
    finally:
        store.close()


@pytest.mark.parametrize("engine", ["edge", "client"])
def test_near_ties_below_float32_resolution_are_ranked_exactly(engine, tmp_path):
    """Random-init CNN volumes give nearly identical vectors (cosines 1 - 1e-8 apart, many exact
    duplicates): the engines' float32 scores cannot order them, the float64 re-rank must."""
    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.server_store import ServerStore

    dim, n, k = 70_000, 30, 8
    base = rng.standard_normal(dim)
    db = base + rng.standard_normal((n, dim)) * rng.uniform(1e-5, 1e-4, (n, 1))
    db[[3, 11, 17]] = db[20]  # exact duplicates: tie -> lower index
    db = db.astype(np.float32)
    q = (base + rng.standard_normal((4, dim)) * 1e-5).astype(np.float32)
    q[3] = db[20]
    meta = CollectionMeta(dataset="syn3d", size=28, model="m", backend="numpy", dim=dim, is_3d=True)
    store = EdgeStore(tmp_path / "store") if engine == "edge" else ServerStore(location=":memory:")
    try:
        fill(store, "near", meta, db, q)
        ref_idx, ref_s = brute_force(q, db, k)
        assert np.ptp(ref_s) < 1e-6  # all within float32 resolution of each other
        res = store.search("near", q, k)
        np.testing.assert_array_equal(res.indices, ref_idx)
        assert list(res.indices[3][:4]) == [3, 11, 17, 20]
        store.exact_rerank = False  # the engines alone: float32 order (the test can fail)
        assert not (store.search("near", q, k).indices == ref_idx).all()
    finally:
        store.close()


def test_server_requests_stay_under_qdrant_request_size_limit():
    """A Qdrant server refuses POST bodies above 32 MB (``service.max_request_size_mb``); upserts and
    query batches of 131,072-dim vectors are split so that each JSON request stays well below it."""
    from qdrant_client import models

    from cbmir.search.server_store import ServerStore

    dim, n, nq = 131_072, 12, 30
    db = rng.standard_normal((n, dim)).astype(np.float32)
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    store = ServerStore(location=":memory:")
    sizes = {"upsert": [], "query": []}
    up, qb = store.client.upsert, store.client.query_batch_points

    def upsert(name, points, **kw):
        sizes["upsert"].append(len(models.PointsList(points=points).model_dump_json()))
        return up(name, points=points, **kw)

    def query_batch_points(name, requests, **kw):
        sizes["query"].append(len(models.QueryRequestBatch(searches=requests).model_dump_json()))
        return qb(name, requests=requests, **kw)

    store.client.upsert, store.client.query_batch_points = upsert, query_batch_points
    try:
        meta = CollectionMeta(dataset="syn3d", size=64, model="m", backend="numpy", dim=dim, is_3d=True)
        fill(store, "big", meta, db, q[:1])
        res = store.search("big", q, 3)  # one call: 30 queries x 3 chunks of 43,691 values
        np.testing.assert_array_equal(res.indices, brute_force(q, db, 3)[0])
    finally:
        store.close()
    limit = 32 * 1024 * 1024
    assert len(sizes["upsert"]) >= 3 and max(sizes["upsert"]) < limit / 2, sizes["upsert"]
    assert len(sizes["query"]) >= 6 and max(sizes["query"]) < limit / 2, sizes["query"]
    # unsplit, the same data would not fit: 12 x 131,072 values as JSON > 32 MB
    assert sum(sizes["upsert"]) > limit


# ----------------------------------------------------------------------------- end to end
class SubsetSource:
    """The first ``n[split]`` rows of a real dataset (keeps the end-to-end test under a few seconds)."""

    def __init__(self, src, n: dict[str, int]) -> None:
        self.src, self.n = src, n
        self.name, self.size, self.is_3d, self.n_classes = src.name, src.size, src.is_3d, src.n_classes

    def split_size(self, split: str) -> int:
        return min(self.n[split], self.src.split_size(split))

    def labels(self, split: str) -> np.ndarray:
        return self.src.labels(split)[: self.split_size(split)]

    def iter_batches(self, split: str, batch_size: int, start: int = 0):
        stop = self.split_size(split)
        for b in self.src.iter_batches(split, batch_size, start=start):
            keep = b.indices < stop
            if keep.any():
                yield Batch(b.images[keep], b.labels[keep], b.indices[keep],
                            [i for i, k in zip(b.image_ids, keep) if k])
            if b.indices[-1] + 1 >= stop:
                return


def test_end_to_end_adrenal3d_hog_equals_brute_force(data_dir, tmp_path):
    from cbmir.evaluation.evaluate import evaluate_collection
    from cbmir.evaluation.metrics import retrieval_metrics
    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.job import ingest
    from cbmir.ingest.medmnist_data import open_medmnist
    from cbmir.search.edge_store import EdgeStore

    src = SubsetSource(open_medmnist("adrenalmnist3d", 28, data_dir), {"train": 120, "test": 40})
    emb = make_embedder(create_extractor("hog"), size=28, is_3d=True)
    with EdgeStore(tmp_path / "store") as store:
        rep = ingest(src, emb, store, batch_size=32, progress=False)
        assert rep.collection == "adrenalmnist3d_28_hog" and rep.meta.dim == 36_288 and rep.meta.is_3d
        assert rep.extra["slices"] == {"train": 120 * 28, "test": 40 * 28}
        assert rep.extra["slices_per_s"]["train"] > 0
        ev = evaluate_collection(store, rep.collection, k=5, progress=False, latency_sample=3)
        _, db, db_pay = store.fetch(rep.collection, "train")
        _, q, q_pay = store.fetch(rep.collection, "test")
    ref_idx, ref_s = brute_force(q, db, 5)
    np.testing.assert_array_equal(ev.topk_indices, ref_idx)
    np.testing.assert_allclose(ev.topk_scores, ref_s, atol=1e-5)
    y_db = np.array([p["label"] for p in db_pay])
    y_q = np.array([p["label"] for p in q_pay])
    np.testing.assert_array_equal(y_db, src.labels("train"))
    ref_m = retrieval_metrics(y_q, y_db[ref_idx], 5)
    assert ev.metrics == pytest.approx(ref_m, abs=1e-12)
    # the stored vectors are the embedder's, whole-vector normalised
    raw = emb.embed(next(src.iter_batches("test", 3)).images)
    np.testing.assert_allclose(q[:3], raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
