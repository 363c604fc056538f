"""Issue 17's wrong numbers: unlabelled rows, multi-label data, self-retrieval, degenerate features.

Each test below failed on the code before the fix (noted per test) and checks the new rule against an
independent computation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cbmir.core.errors import CbmirError
from cbmir.evaluation.evaluate import evaluate_collection
from cbmir.evaluation.metrics import retrieval_metrics
from cbmir.search.diagnostics import COLLAPSE_THRESHOLD, median_pairwise_cosine
from cbmir.search.schema import CollectionMeta, make_payload


def _edge(tmp_path):
    from cbmir.search.edge_store import EdgeStore

    return EdgeStore(tmp_path / "store")


def _hog(size=28):
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor

    return make_embedder(create_extractor("hog"), size=size, is_3d=False)


def _put(store, name, split, vectors, labels):
    """Upsert rows 0..N-1 of ``split`` with ``labels`` into collection ``name``."""
    payloads = [make_payload(dataset="synthetic", split=split, index=i, label=int(y), model="none", size=1,
                             image_id=f"{split}/{i}") for i, y in enumerate(labels)]
    store.upsert(name, split, list(range(len(labels))), np.asarray(vectors, np.float32), payloads)


def _synthetic(store, name, train, y_train, test, y_test):
    store.ensure_collection(name, CollectionMeta(dataset="synthetic", size=1, model="none", backend="numpy",
                                                 dim=np.shape(train)[1]))
    _put(store, name, "train", train, y_train)
    _put(store, name, "test", test, y_test)


# ============================================================== 1. unlabelled rows (old: 100 % everywhere)
def _manifest(tmp_path, rows):
    """A manifest of 28x28 PNGs: ``rows`` = (file stem, image seed, label or '', split)."""
    lines = ["path,label,split"]
    for stem, seed, label, split in rows:
        img = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / f"{stem}.png")
        lines.append(f"{stem}.png,{label},{split}")
    path = tmp_path / "archive.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _ingest_manifest(tmp_path, rows):
    from cbmir.ingest.job import ingest
    from cbmir.ingest.sources.manifest import ManifestSource

    store = _edge(tmp_path)
    rep = ingest(ManifestSource(_manifest(tmp_path, rows), 28), _hog(), store, progress=False)
    return store, rep.collection


def test_unlabelled_query_is_not_scored_issue_case(tmp_path):
    """The issue's manifest: unlabelled database row X, labelled row Y, an unlabelled query copied from X.
    Old code: mAP@1 = mMV@1 = ACC@1 = 100 % and majority-class rate 100 %. Now: nothing to score."""
    store, name = _ingest_manifest(tmp_path, [("x", 1, "", "train"), ("y", 2, 0, "train"),
                                              ("qx", 1, "", "test")])
    with store, pytest.raises(CbmirError) as info:
        evaluate_collection(store, name, k=1, progress=False, latency_sample=0)
    msg = str(info.value)
    assert name in msg and "1 of 1 test (query) points" in msg and "unlabelled" in msg


def test_unlabelled_rows_excluded_as_queries_never_relevant_and_counted(tmp_path):
    """Labelled query = copy of the unlabelled database image X: its top-1 is X (label -1), never a match.
    Old code: the unlabelled query scored 1 on everything (ACC@1 0.5, majority rate 0.5)."""
    store, name = _ingest_manifest(tmp_path, [("x", 1, "", "train"), ("y", 2, 0, "train"), ("z", 3, 1, "train"),
                                              ("qx", 1, "", "test"), ("lx", 1, 0, "test")])
    with store:
        ev = evaluate_collection(store, name, k=2, progress=False, latency_sample=0)
    assert ev.metrics["ACC@1"] == 0.0
    # majority class of the labelled database (0 and 1 tie -> 0) on the labelled query: 1/1
    assert ev.majority_class_rate == 1.0
    assert ev.query_labels.tolist() == [0] and ev.topk_labels[0, 0] == -1   # X itself ranks first
    independent = retrieval_metrics(np.array([0]), np.where(ev.topk_labels < 0, 99, ev.topk_labels), 2)
    assert ev.metrics == pytest.approx(independent)                          # -1 behaves like a foreign class
    assert (ev.n_queries, ev.n_database, ev.n_unlabelled_queries, ev.n_unlabelled_database) == (1, 3, 1, 1)


# ============================================================== 2. multi-label data (old: 100 %)
def _chest_file(tmp_path, monkeypatch, n=(8, 2, 6)):
    """A ChestMNIST-shaped file (uint8 28x28 images, 14-column multi-hot labels) with small splits."""
    from medmnist import INFO

    monkeypatch.setitem(INFO["chestmnist"], "n_samples", dict(zip(("train", "val", "test"), n)))
    rng = np.random.default_rng(0)
    arrays = {}
    for split, m in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (m, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((m, 14)) < 0.3).astype(np.uint8)
    np.savez_compressed(tmp_path / "chestmnist.npz", **arrays)
    return tmp_path


def test_multilabel_chestmnist_is_refused_naming_the_dataset(tmp_path, monkeypatch):
    from cbmir.ingest.job import ingest
    from cbmir.ingest.medmnist_data import open_medmnist

    src = open_medmnist("chestmnist", 28, _chest_file(tmp_path, monkeypatch), verify=False)
    store = _edge(tmp_path)
    with store:
        rep = ingest(src, _hog(), store, progress=False)
        with pytest.raises(CbmirError) as info:
            evaluate_collection(store, rep.collection, k=5, progress=False, latency_sample=0)
        msg = str(info.value)
        assert "'chestmnist'" in msg and "multi-label" in msg and "cbmir search" in msg
        assert store.meta(rep.collection).extra["task"] == "multi-label, binary-class"
        # a collection ingested before the task was recorded: recognised from its MedMNIST flag
        meta = store.meta(rep.collection)
        meta.extra = {k: v for k, v in meta.extra.items() if k != "task"}
        store.write_meta(rep.collection, meta)
        with pytest.raises(CbmirError, match="multi-label"):
            evaluate_collection(store, rep.collection, k=5, progress=False, latency_sample=0)


# ============================================================== 3. leave-one-out (old: ACC@1 = 100 %)
def test_query_split_equal_to_database_split_is_leave_one_out(tmp_path, data_dir):
    """PneumoniaMNIST 28 hog, test split as queries and database. Old code: ACC@1 = ACC@3 = ACC@5 = 1.0,
    mAP@5 0.943. Now each query's own point is excluded; checked against a float64 numpy brute force."""
    from cbmir.ingest.job import ingest
    from cbmir.ingest.medmnist_data import open_medmnist

    src = open_medmnist("pneumoniamnist", 28, data_dir)
    emb = _hog()
    store = _edge(tmp_path)
    with store:
        rep = ingest(src, emb, store, splits=("test",), progress=False)
        ev = evaluate_collection(store, rep.collection, k=5, database_split="test", query_split="test",
                                 progress=False, latency_sample=0)
        ev_b = evaluate_collection(store, rep.collection, k=5, database_split="test", query_split="test",
                                   progress=False, latency_sample=0, search_backend="blas")
    assert not (ev.topk_indices == ev.query_indices[:, None]).any()       # never itself
    assert ev.n_queries == ev.n_database == 624
    images = np.concatenate([b.images for b in src.iter_batches("test", 256)])
    x = emb.embed(images).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :5]                    # ties -> lower row
    y = src.labels("test")
    agree = (ref == ev.topk_indices).all(axis=1).mean()
    assert agree > 0.99, agree                                              # float32 engine vs float64 ties
    ref_m = retrieval_metrics(y, y[ref], 5)
    for m, v in ref_m.items():
        assert ev.metrics[m] == pytest.approx(v, abs=2e-3), m
    assert ev.metrics["ACC@1"] == pytest.approx(0.793, abs=2e-3)
    assert ev.metrics["mAP@5"] == pytest.approx(0.855, abs=2e-3)
    np.testing.assert_array_equal(ev_b.topk_indices, ev.topk_indices)      # blas backend: same rule
    assert ev.leave_one_out and (ev.query_split, ev.database_split) == ("test", "test")


def test_leave_one_out_with_duplicates_drops_the_query_by_id_not_by_score(tmp_path):
    """Rows 0 and 1 hold the same vector: query 1's best hit is row 0 (same score, lower row), and
    its own point (row 1) is dropped, not row 0. k must leave a candidate after the exclusion."""
    store = _edge(tmp_path)
    v = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    with store:
        _synthetic(store, "c", v, [0, 1, 0, 1], v, [0, 1, 0, 1])
        ev = evaluate_collection(store, "c", k=1, database_split="test", query_split="test", progress=False,
                                 latency_sample=0)
        assert ev.topk_indices[:2, 0].tolist() == [1, 0]
        with pytest.raises(CbmirError, match="between 1 and 3"):
            evaluate_collection(store, "c", k=4, database_split="test", query_split="test", progress=False)
        with pytest.raises(CbmirError, match="unknown query split 'tset'"):
            evaluate_collection(store, "c", query_split="tset", progress=False)


# ============================================================== 4. degenerate features (old: silent)
def test_all_zero_query_vectors_are_warned_with_count_and_rows(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(20, 8)), rng.normal(size=(12, 8))
    test[[3, 7]] = 0.0
    store = _edge(tmp_path)
    with store:
        _synthetic(store, "z", train, rng.integers(0, 2, 20), test, rng.integers(0, 2, 12))
        ev = evaluate_collection(store, "z", k=3, progress=False, latency_sample=0)
    assert len(ev.warnings) == 1, ev.warnings
    assert "2 of 12 query vector(s) are all zeros (test rows [3, 7])" in ev.warnings[0]
    assert "\n" not in ev.warnings[0]
    assert ev.topk_indices[3].tolist() == [0, 1, 2]                         # the tie rule, as warned


def test_collapsed_collection_is_warned_and_healthy_one_is_not(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.normal(size=16)
    collapsed = base + 0.05 * rng.normal(size=(300, 16))                   # all nearly the same direction
    healthy = rng.normal(size=(300, 16))
    expected = median_pairwise_cosine(collapsed[:0])                       # (nan, 0): nothing to compare
    assert np.isnan(expected[0]) and expected[1] == 0
    store = _edge(tmp_path)
    with store:
        _synthetic(store, "col", collapsed, rng.integers(0, 2, 300), healthy[:10], rng.integers(0, 2, 10))
        _synthetic(store, "ok", healthy, rng.integers(0, 2, 300), healthy[:10], rng.integers(0, 2, 10))
        ev = evaluate_collection(store, "col", k=3, progress=False, latency_sample=0)
        ev_ok = evaluate_collection(store, "ok", k=3, progress=False, latency_sample=0)
    assert ev_ok.warnings == []
    assert len(ev.warnings) == 1 and "'col' looks collapsed" in ev.warnings[0]
    assert "256 sampled train points (of 300" in ev.warnings[0] and f"above {COLLAPSE_THRESHOLD:g}" in ev.warnings[0]


def evaluate_tiny_archive(tmp_path, *args) -> tuple[str, dict, int]:
    """``cbmir evaluate -o`` (k = 1, extra ``args``) on a tiny ingested HOG archive, then the independent float64
    brute force (:mod:`cbmir.benchmarks.check_bruteforce`) on its ``cbmir export``.

    Returns:
        ``(stdout of evaluate, its JSON, the brute-force check's exit code)``.
    """
    from test_reliability import run_main
    from test_sources import _ingest_cli, _tiny_archive

    from cbmir.benchmarks.check_bruteforce import main as check

    a = _tiny_archive(tmp_path / "arch", n_train=3)
    store = tmp_path / "store"
    assert _ingest_cli(a, store).exit_code == 0
    out_json = tmp_path / "r.json"
    code, out, err = run_main("evaluate", "-d", a, "-m", "hog", "-s", "16", "--store-path", store, "--k", "1",
                              *args, "-o", out_json)
    assert code == 0, err
    code, _, err = run_main("export", "-d", a, "-m", "hog", "-s", "16", "--store-path", store,
                            "-o", tmp_path / "v.npz")
    assert code == 0, err
    return out, json.loads(out_json.read_text()), check([str(tmp_path / "v.npz"), str(out_json)])


def test_cli_evaluate_leave_one_out_and_warnings_in_output(tmp_path):
    out, r, checked = evaluate_tiny_archive(tmp_path, "--query-split", "train", "--database-split", "train")
    assert "leave-one-out: query split = database split (train)" in out and "(train queries, train database)" in out
    assert r["leave_one_out"] is True and r["query_split"] == r["database_split"] == "train"
    assert r["n_queries"] == 6 and r["warnings"] == [] and r["n_unlabelled_queries"] == 0
    assert not any(q == t[0] for q, t in zip(r["per_query"]["query_indices"], r["per_query"]["topk_indices"]))
    # the independent float64 brute force agrees (it reads the splits and leave-one-out from the JSON)
    assert checked == 0
