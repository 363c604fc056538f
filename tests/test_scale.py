"""Beyond one machine (issue 19): approximate search modes, sharded ingest, Qdrant cluster settings, and the
compose files' server pins.

No Qdrant server can run here: the cluster settings are checked in the requests qdrant-client sends (a
recording HTTP server for REST, a recording gRPC server built from qdrant-client's own service stubs for
gRPC) and against qdrant-client's local mode, which accepts them.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from concurrent import futures
from contextlib import redirect_stderr, redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from cbmir.core.errors import CbmirError
from cbmir.search.cluster import ClusterConfig, collection_params, parse_read_consistency, search_params
from cbmir.search.index_config import IndexConfig, index_config
from cbmir.search.schema import CollectionMeta, make_payload

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


# ============================================================================ helpers
def clustered(n: int, dim: int, seed: int, n_clusters: int = 20, latent: int = 8) -> np.ndarray:
    """Non-negative clustered vectors of low intrinsic dimension (``relu(z W)``, z a Gaussian mixture)."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((n_clusters, latent))
    z = centres[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, latent))
    w = np.random.default_rng(1234).standard_normal((latent, dim))
    return (np.maximum(z @ w, 0) + 0.01 * rng.random((n, dim))).astype(np.float32)


def brute_topk(q: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    """Independent float64 cosine top-k row indices (ties by lower row)."""
    qn = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    dn = db.astype(np.float64) / np.linalg.norm(db, axis=1, keepdims=True)
    return np.argsort(-(qn @ dn.T), axis=1, kind="stable")[:, :k]


def fill(store, name: str, db: np.ndarray, q: np.ndarray, mode: IndexConfig | None = None) -> CollectionMeta:
    meta = CollectionMeta(dataset="toy", size=28, model="m", backend="numpy", dim=db.shape[1],
                          index=(mode or IndexConfig()).to_meta())
    store.ensure_collection(name, meta)
    for split, x in (("train", db), ("test", q)):
        pays = [make_payload(dataset="toy", split=split, index=i, label=i % 3, model="m", size=28,
                             image_id=f"{split}/{i}") for i in range(len(x))]
        store.upsert(name, split, list(range(len(x))), x, pays)
    store.build_index(name)
    return meta


def recall(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, ref)]))


def run_main(*args) -> tuple[int, str, str]:
    """``cbmir ARGS`` in-process: ``(exit code, stdout, stderr)``."""
    from cbmir import cli

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["cbmir", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBMIR_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)
    return env


# ============================================================================ approximate modes
def test_index_config_from_options_and_metadata():
    assert index_config() is None  # nothing asked: the collection keeps its mode (new ones: exact)
    cfg = index_config("hnsw", "int8", m=32, ef=64, oversampling=3.0)
    assert (cfg.index, cfg.quantization, cfg.m, cfg.ef, cfg.oversampling, cfg.ef_construct) == \
        ("hnsw", "int8", 32, 64, 3.0, 100)
    assert IndexConfig.from_meta(cfg.to_meta()) == cfg and cfg.name == "hnsw+int8"
    assert IndexConfig().to_meta() == {} and not IndexConfig().approximate  # exact: metadata as before
    assert index_config(quantization="binary").name == "exact+binary"
    for bad in (dict(m=8), dict(index="exact", ef=10), dict(index="hnsw", rescore=False),
                dict(index="ivf"), dict(index="hnsw", m=1), dict(quantization="int8", oversampling=0.5)):
        with pytest.raises(CbmirError):
            index_config(**bad)
    with pytest.raises(CbmirError, match="chunks"):  # > 65,535 dims: scores summed over chunks, exact only
        CollectionMeta(dataset="t", size=28, model="m", backend="numpy", dim=70_000,
                       index=IndexConfig(index="hnsw").to_meta())


def test_search_parameters_of_each_mode():
    hnsw = IndexConfig(index="hnsw", quantization="int8", ef=77, oversampling=3.0)
    p = search_params(hnsw)
    assert (p.exact, p.hnsw_ef, p.quantization.rescore, p.quantization.oversampling) == (False, 77, True, 3.0)
    exact = search_params(None)
    assert exact.exact is True and exact.quantization.ignore is True
    assert collection_params(IndexConfig())["hnsw_config"].m == 0  # exact: no graph built on a server
    c = collection_params(hnsw)
    assert (c["hnsw_config"].m, c["hnsw_config"].ef_construct) == (16, 100)
    assert c["quantization_config"].scalar.type.value == "int8"
    assert collection_params(IndexConfig(quantization="binary"))["quantization_config"].binary.always_ram


@pytest.mark.parametrize("mode", [IndexConfig(index="hnsw", full_scan_kb=1),
                                  IndexConfig(index="hnsw", quantization="int8", full_scan_kb=1),
                                  IndexConfig(quantization="int8", full_scan_kb=1)], ids=lambda m: m.name)
def test_approximate_collection_searched_in_its_mode_and_exactly_on_request(store, mode):
    db, q = clustered(3000, 48, seed=1), clustered(60, 48, seed=2)
    meta = fill(store, "toy_approx", db, q, mode)
    assert store.meta("toy_approx").index_config() == mode  # recorded in the metadata
    ref = brute_topk(q, db, 10)
    exact = store.search("toy_approx", q, 10, exact=True)
    np.testing.assert_array_equal(exact.indices, ref)  # the study's path stays exact on any collection
    approx = store.search("toy_approx", q, 10)
    assert recall(approx.indices, ref) >= 0.9
    if store.engine == "qdrant-edge":  # Edge built the graph / quantized vectors (optimize)
        from cbmir.search.edge_store import _SHARDS

        info = _SHARDS[store._key("toy_approx")].info()  # noqa: SLF001
        assert info.indexed_vectors_count == len(db) + len(q)
    assert meta.index_config().approximate


def test_edge_approximate_queries_use_the_mode(tmp_path, monkeypatch):
    """The search path passes the collection's mode (exact=False, ef) to the engine; ``exact=True`` and the
    study's evaluation pass exact=True."""
    import qdrant_edge as qe

    from cbmir.evaluation.evaluate import evaluate_collection
    from cbmir.search.edge_store import EdgeStore

    seen = []
    real = qe.SearchParams

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    with EdgeStore(tmp_path / "s") as st:
        fill(st, "c", clustered(500, 16, 3), clustered(20, 16, 4), IndexConfig(index="hnsw", ef=40))
        monkeypatch.setattr(qe, "SearchParams", spy)
        st.search("c", clustered(3, 16, 5), 5)
        assert seen and all(s["exact"] is False and s["hnsw_ef"] == 40 for s in seen)
        seen.clear()
        st.search("c", clustered(3, 16, 5), 5, ef=200)
        assert all(s["hnsw_ef"] == 200 for s in seen)
        seen.clear()
        evaluate_collection(st, "c", k=5, progress=False, latency_sample=2)
        assert seen and all(s["exact"] is True for s in seen)


def test_evaluate_and_search_of_an_approximate_collection(tmp_path):
    """evaluate: exact on an HNSW collection (same metrics and top-k as on an exact one); the search path uses
    the mode and says so; --exact / ef rules."""
    from cbmir.app import App, SearchRequest, load_settings, search
    from cbmir.evaluation.evaluate import evaluate_collection
    from cbmir.search.edge_store import EdgeStore

    db, q = clustered(2000, 32, 6), clustered(50, 32, 7)
    with EdgeStore(tmp_path / "s") as st:
        fill(st, "exact_c", db, q)
        fill(st, "hnsw_c", db, q, IndexConfig(index="hnsw", quantization="int8", full_scan_kb=1))
        a = evaluate_collection(st, "exact_c", k=5, progress=False, latency_sample=0)
        b = evaluate_collection(st, "hnsw_c", k=5, progress=False, latency_sample=0)
        assert a.metrics == b.metrics
        np.testing.assert_array_equal(a.topk_indices, b.topk_indices)
        app = App(load_settings(store_path=str(tmp_path / "s")), store=st)
        r = search(app, SearchRequest("hnsw_c", points=[("test", 0)], k=5))
        assert r.search_mode == "hnsw+int8 (ef=128)" and any("approximate" in n for n in r.notes)
        r = search(app, SearchRequest("hnsw_c", points=[("test", 0)], k=5, exact=True))
        assert r.search_mode == "exact" and [h.index for h in r.hits[0]] == a.topk_indices[0].tolist()
        assert search(app, SearchRequest("hnsw_c", points=[("test", 0)], k=5, ef=300)).search_mode.endswith("300)")
        with pytest.raises(CbmirError, match="ef"):
            search(app, SearchRequest("exact_c", points=[("test", 0)], k=5, ef=50))


# ============================================================================ sharded ingest
def test_share_rule_is_stable_and_balanced():
    from cbmir.ingest.shards import Share, parse_share, row_shares, share_of

    # the rule is SplitMix64's output for state = point id (an independent pure-Python reference, checked against
    # SplitMix64's published first outputs for seed 0); a change would split a running ingest differently
    m64 = (1 << 64) - 1

    def splitmix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & m64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m64
        return x ^ (x >> 31)

    assert (splitmix(0), splitmix(0x9E3779B97F4A7C15)) == (0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4)
    ids = [0, 1, 2, 3, 12345, (1 << 40) + 7, (2 << 40) + 89_995]
    for n in (1, 2, 3, 7, 64):
        assert share_of(ids, n).tolist() == [splitmix(i) % n for i in ids]
    counts = np.bincount(row_shares("train", 100_000, 8), minlength=8)
    assert counts.min() > 12_000 and counts.max() < 13_000
    masks = [Share(i, 3).mine("test", 1000) for i in range(3)]
    assert np.array_equal(np.sum(masks, axis=0), np.ones(1000))  # every row in exactly one share
    assert parse_share(" 1/4 ") == Share(1, 4) and parse_share(None) is None
    for bad in ("4/4", "1", "-1/2", "a/b", "1/0"):
        with pytest.raises(CbmirError, match="--shard"):
            parse_share(bad)


def _export(store_path: Path, out: Path) -> dict:
    code, _, err = run_main("export", "-d", "breastmnist", "-m", "hog", "--store-path", store_path, "-o", out)
    assert code == 0, err
    return dict(np.load(out))


def test_two_share_processes_equal_one_process(tmp_path, data_dir):
    """Two concurrent processes --shard 0/2 and --shard 1/2 on the embedded engine (staging + merge in turns)
    build the collection one process builds: same exported vectors, payloads and evaluation."""
    from cbmir.evaluation.evaluate import evaluate_collection
    from cbmir.search.edge_store import EdgeStore

    base = [PY, "-m", "cbmir.cli", "ingest", "-d", "breastmnist", "-m", "hog", "--data-dir", str(data_dir)]
    one = subprocess.run([*base, "--store-path", str(tmp_path / "one")], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    procs = [subprocess.Popen([*base, "--store-path", str(tmp_path / "two"), "--shard", f"{i}/2"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    said = "".join(o[0] for o in outs)
    assert "share 0/2 done" in said and "share 1/2 done" in said and ": complete" in said

    a, b = _export(tmp_path / "one", tmp_path / "a.npz"), _export(tmp_path / "two", tmp_path / "b.npz")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert len(a["train_vectors"]) == 546 and len(a["test_vectors"]) == 156
    with EdgeStore(tmp_path / "one") as s1, EdgeStore(tmp_path / "two") as s2:
        assert s2.list_collections() == ["breastmnist_28_hog"]  # staging collections merged and removed
        for split in ("train", "test"):
            assert s1.fetch("breastmnist_28_hog", split, with_vectors=False)[2] == \
                s2.fetch("breastmnist_28_hog", split, with_vectors=False)[2]  # payloads
        e1 = evaluate_collection(s1, "breastmnist_28_hog", progress=False, latency_sample=0)
        e2 = evaluate_collection(s2, "breastmnist_28_hog", progress=False, latency_sample=0)
        assert e1.metrics == e2.metrics and abs(e1.metrics["ACC@1"] - 0.8013) < 1e-3  # DESIGN.md §3
        np.testing.assert_array_equal(e1.topk_indices, e2.topk_indices)
        np.testing.assert_array_equal(e1.topk_scores, e2.topk_scores)
        assert s2.meta("breastmnist_28_hog").extra["completed"] == {"train": 546, "test": 156}
    code, out, _ = run_main("verify", "-d", "breastmnist", "-m", "hog", "--store-path", tmp_path / "two",
                            "--data-dir", data_dir)
    assert code == 0 and out.startswith("OK"), out


def _open_hog(data_dir):
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.medmnist_data import open_medmnist

    src = open_medmnist("breastmnist", 28, data_dir=data_dir)
    return src, make_embedder(create_extractor("hog"), size=28, is_3d=False)


def test_missing_share_named_by_verify_and_evaluate_refused(tmp_path, data_dir):
    from cbmir.ingest.job import ingest
    from cbmir.ingest.shards import Share
    from cbmir.search.edge_store import EdgeStore

    src, emb = _open_hog(data_dir)
    with EdgeStore(tmp_path / "s") as st:
        rep = ingest(src, emb, st, shard=Share(2, 3), progress=False)
        assert rep.extra["share"]["complete"] is False
    code, out, _ = run_main("verify", "-d", "breastmnist", "-m", "hog", "--store-path", tmp_path / "s",
                            "--data-dir", data_dir)
    assert code == 1 and "missing share(s) 0/3" in out and "1/3" in out and "2/3" not in out, out
    code, _, err = run_main("evaluate", "-d", "breastmnist", "-m", "hog", "--store-path", tmp_path / "s")
    assert code == 2 and "incomplete" in err


def test_interrupted_merge_is_named_and_resumed(tmp_path, data_dir, monkeypatch):
    """A share killed while merging leaves its staging collection: verify names it; re-running the share merges
    it without embedding again."""
    from cbmir.ingest.job import ingest
    from cbmir.ingest.shards import Share
    from cbmir.search.edge_store import EdgeStore

    src, emb = _open_hog(data_dir)
    with EdgeStore(tmp_path / "s") as st:
        ingest(src, emb, st, shard=Share(0, 2), progress=False)

        def killed(*a, **kw):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(EdgeStore, "copy_points", killed)
            with pytest.raises(KeyboardInterrupt):
                ingest(src, emb, st, shard=Share(1, 2), progress=False)
    code, out, _ = run_main("verify", "-d", "breastmnist", "-m", "hog", "--store-path", tmp_path / "s",
                            "--data-dir", data_dir)
    assert code == 1 and re.search(r"share\(s\) 1/2 \(\d+ points\) embedded but not merged", out), out
    with EdgeStore(tmp_path / "s") as st:
        rep = ingest(src, emb, st, shard=Share(1, 2), progress=False)
        assert sum(rep.written.values()) == 0 and rep.extra["share"]["complete"]  # merged, nothing re-embedded
        assert rep.extra["share"]["merged"] > 0 and st.count("breastmnist_28_hog") == 702
    code, out, _ = run_main("verify", "-d", "breastmnist", "-m", "hog", "--store-path", tmp_path / "s",
                            "--data-dir", data_dir)
    assert code == 0, out


def test_shares_write_directly_on_a_server(data_dir):
    """Server path (qdrant-client local mode): shares upsert into the collection itself (no staging), and the
    result equals one ingest; another share count is refused while the collection is incomplete."""
    from cbmir.ingest.job import ingest
    from cbmir.ingest.shards import Share
    from cbmir.search.server_store import ServerStore

    src, emb = _open_hog(data_dir)
    one, two = ServerStore(location=":memory:"), ServerStore(location=":memory:")
    ingest(src, emb, one, progress=False)
    r0 = ingest(src, emb, two, shard=Share(0, 2), progress=False)
    assert two.list_collections() == ["breastmnist_28_hog"] and r0.extra["share"]["merged"] == 0
    with pytest.raises(CbmirError, match="2 shares"):
        ingest(src, emb, two, shard=Share(0, 3), progress=False)
    assert ingest(src, emb, two, shard=Share(1, 2), progress=False).extra["share"]["complete"]
    for split in ("train", "test"):
        i1, v1, p1 = one.fetch("breastmnist_28_hog", split)
        i2, v2, p2 = two.fetch("breastmnist_28_hog", split)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(v1, v2)
        assert p1 == p2


# ============================================================================ Qdrant cluster settings
class _Recorder(BaseHTTPRequestHandler):
    """A stand-in Qdrant REST endpoint: records (method, path, query, JSON body), answers minimal JSON."""

    seen: list = []

    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"null")
        url = urlparse(self.path)
        self.seen.append((self.command, url.path, parse_qs(url.query), body))
        if url.path.endswith("/exists"):
            result = {"exists": False}
        elif url.path.endswith("/query/batch"):
            result = [{"points": []} for _ in body["searches"]]
        elif url.path.endswith("/index") or url.path.endswith("/points"):
            result = {"operation_id": 1, "status": "completed"}
        else:
            result = True
        data = json.dumps({"result": result, "status": "ok", "time": 0.0}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = _answer  # noqa: N815

    def log_message(self, *a):
        pass


@pytest.fixture
def rest_server():
    _Recorder.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Recorder.seen
    srv.shutdown()
    srv.server_close()


META = CollectionMeta(dataset="toy", size=28, model="m", backend="numpy", dim=8,
                      index=IndexConfig(index="hnsw", quantization="int8", m=24, ef_construct=200).to_meta())


def test_cluster_settings_reach_collection_creation_over_rest(rest_server):
    from cbmir.search.server_store import ServerStore

    url, seen = rest_server
    cluster = ClusterConfig(shard_number=6, replication_factor=2, write_consistency_factor=2,
                            read_consistency="majority")
    st = ServerStore(url=url, cluster=cluster, retry_total_s=0)
    assert st.transport == "rest"
    st.ensure_collection("toy_c", META)
    create = [b for m, p, _, b in seen if m == "PUT" and p == "/collections/toy_c"]
    assert len(create) == 1
    body = create[0]
    assert (body["shard_number"], body["replication_factor"], body["write_consistency_factor"]) == (6, 2, 2)
    assert (body["hnsw_config"]["m"], body["hnsw_config"]["ef_construct"]) == (24, 200)
    assert body["quantization_config"]["scalar"]["type"] == "int8"
    assert json.loads(body["metadata"]["cbmir"])["index"]["index"] == "hnsw"
    indexes = {b["field_name"]: b["field_schema"] for m, p, _, b in seen if p == "/collections/toy_c/index"}
    assert indexes == {"split": "keyword", "label": "integer"}
    seen.clear()
    st._query("toy_c", "v0", np.ones((2, 8), np.float32), 5, "train", META.index_config().with_ef(99))  # noqa: SLF001
    (_, path, query, body), = seen
    assert path == "/collections/toy_c/points/query/batch" and query["consistency"] == ["majority"]
    assert [s["params"]["hnsw_ef"] for s in body["searches"]] == [99, 99]
    assert body["searches"][0]["params"]["exact"] is False
    seen.clear()
    st.ensure_collection("toy_exact", CollectionMeta(dataset="toy", size=28, model="m", backend="numpy", dim=8))
    body = [b for m, p, _, b in seen if m == "PUT" and p == "/collections/toy_exact"][0]
    assert body["hnsw_config"]["m"] == 0 and "quantization_config" not in body  # exact: no graph, no codes


def test_defaults_send_no_cluster_settings(rest_server):
    from cbmir.search.server_store import ServerStore

    url, seen = rest_server
    ServerStore(url=url, retry_total_s=0).ensure_collection("toy_d", META)
    body = [b for m, p, _, b in seen if m == "PUT" and p == "/collections/toy_d"][0]
    assert not {"shard_number", "replication_factor", "write_consistency_factor"} & set(body)


@pytest.fixture
def grpc_server():
    """A stand-in Qdrant gRPC endpoint built from qdrant-client's service stubs; records every request."""
    import grpc
    from qdrant_client import grpc as qg

    seen = []
    done = qg.PointsOperationResponse(result=qg.UpdateResult(operation_id=1, status=qg.UpdateStatus.Completed))

    class Points(qg.PointsServicer):
        def Upsert(self, request, context):  # noqa: N802
            seen.append(("Upsert", request))
            return done

        def CreateFieldIndex(self, request, context):  # noqa: N802
            seen.append(("CreateFieldIndex", request))
            return done

        def QueryBatch(self, request, context):  # noqa: N802
            seen.append(("QueryBatch", request))
            return qg.QueryBatchResponse(result=[qg.BatchResult() for _ in request.query_points])

    class Collections(qg.CollectionsServicer):
        def CollectionExists(self, request, context):  # noqa: N802
            seen.append(("CollectionExists", request))
            return qg.CollectionExistsResponse(result=qg.CollectionExists(exists=False))

        def Create(self, request, context):  # noqa: N802
            seen.append(("Create", request))
            return qg.CollectionOperationResponse(result=True)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    qg.add_PointsServicer_to_server(Points(), server)
    qg.add_CollectionsServicer_to_server(Collections(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, seen
    server.stop(None)


def test_grpc_chosen_when_configured(grpc_server, rest_server):
    """prefer_grpc: creation, bulk upserts and batched queries go over gRPC (the REST endpoint sees nothing),
    with the cluster settings; without it the same calls go over REST."""
    from cbmir.search.server_store import ServerStore

    port, seen = grpc_server
    url, rest_seen = rest_server
    st = ServerStore(url=url, retry_total_s=0, cluster=ClusterConfig(prefer_grpc=True, grpc_port=port,
                                                                      shard_number=3, replication_factor=2,
                                                                      read_consistency=2))
    assert st.transport == "grpc"
    st.ensure_collection("toy_g", META)
    st._upsert("toy_g", [1, 2], {"v0": np.ones((2, 8), np.float32)}, [{"split": "train"}, {"split": "train"}])  # noqa: SLF001
    st._query("toy_g", "v0", np.ones((3, 8), np.float32), 5, "train")  # noqa: SLF001
    kinds = [k for k, _ in seen]
    assert kinds == ["CollectionExists", "Create", "CreateFieldIndex", "CreateFieldIndex", "Upsert", "QueryBatch"]
    create = seen[1][1]
    assert (create.shard_number, create.replication_factor, create.hnsw_config.m) == (3, 2, 24)
    assert len(seen[4][1].points) == 2
    qb = seen[5][1]
    assert len(qb.query_points) == 3 and qb.read_consistency.factor == 2
    assert qb.query_points[0].params.exact is True  # an explicit mode-less query is exact
    assert rest_seen == []
    rest = ServerStore(url=url, retry_total_s=0)  # REST by default
    assert rest.transport == "rest"
    rest._upsert("toy_g", [1], {"v0": np.ones((1, 8), np.float32)}, [{"split": "train"}])  # noqa: SLF001
    assert [p for _, p, _, _ in rest_seen] == ["/collections/toy_g/points"] and len(seen) == 6


def test_local_mode_accepts_cluster_settings():
    from cbmir.search.server_store import ServerStore

    st = ServerStore(location=":memory:", cluster=ClusterConfig(shard_number=4, replication_factor=2,
                                                                write_consistency_factor=2, read_consistency="all"))
    db, q = clustered(400, 16, 8), clustered(10, 16, 9)
    fill(st, "toy_l", db, q, IndexConfig(index="hnsw", quantization="int8"))
    np.testing.assert_array_equal(st.search("toy_l", q, 5, exact=True).indices, brute_topk(q, db, 5))


def test_settings_and_flags_reach_the_store(monkeypatch, tmp_path):
    from cbmir.app import load_settings
    from cbmir.search.store import open_store

    for k, v in dict(CBMIR_QDRANT_SHARD_NUMBER="4", CBMIR_QDRANT_REPLICATION_FACTOR="3",
                     CBMIR_QDRANT_WRITE_CONSISTENCY_FACTOR="2", CBMIR_QDRANT_READ_CONSISTENCY="quorum",
                     CBMIR_QDRANT_PREFER_GRPC="true").items():
        monkeypatch.setenv(k, v)
    st = open_store(load_settings(qdrant_url="http://127.0.0.1:9"))
    assert st.cluster == ClusterConfig(shard_number=4, replication_factor=3, write_consistency_factor=2,
                                       read_consistency="quorum", prefer_grpc=True)
    assert st.client._client._prefer_grpc is True and st.transport == "grpc"  # noqa: SLF001
    monkeypatch.setenv("CBMIR_QDRANT_READ_CONSISTENCY", "most")
    with pytest.raises(CbmirError, match="read-consistency"):
        load_settings()
    assert parse_read_consistency("3") == 3 and parse_read_consistency(None) is None
    with pytest.raises(CbmirError, match="exceeds"):
        ClusterConfig(replication_factor=1, write_consistency_factor=2)
    monkeypatch.delenv("CBMIR_QDRANT_READ_CONSISTENCY")

    captured = {}

    def fake_ingest(app, ref, **kw):
        captured.update(kw, settings=app.settings)
        raise CbmirError("stop")

    monkeypatch.setattr("cbmir.app.ingesting.ingest_collection", fake_ingest)
    code, _, err = run_main("ingest", "-d", "breastmnist", "-m", "hog", "--store-path", tmp_path / "s",
                            "--shard", "1/3", "--index", "hnsw", "--quantization", "int8", "--hnsw-ef", "64",
                            "--shard-number", "6", "--no-prefer-grpc", "--read-consistency", "majority")
    assert code == 2 and "stop" in err
    s = captured["settings"]
    assert (s.qdrant_shard_number, s.qdrant_prefer_grpc, s.qdrant_read_consistency) == (6, False, "majority")
    assert str(captured["shard"]) == "1/3" and captured["index"] == IndexConfig(index="hnsw", quantization="int8",
                                                                                 ef=64)
    code, _, err = run_main("ingest", "-d", "breastmnist", "-m", "hog", "--hnsw-m", "8")
    assert code == 2 and "--index hnsw" in err


# ============================================================================ compose files
def test_compose_server_images_match_the_client_minor():
    """Every compose file pins one qdrant/qdrant release whose major.minor equals the pinned qdrant-client's."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    client = next(re.fullmatch(r"qdrant-client==(\d+)\.(\d+)\.(\d+)", d) for d in deps if d.startswith("qdrant-client"))
    assert client, "qdrant-client must be pinned exactly"
    files = sorted(REPO.glob("docker-compose*.yml"))
    assert {f.name for f in files} >= {"docker-compose.yml", "docker-compose.cluster.yml"}
    tags = set()
    for f in files:
        images = re.findall(r"image:\s*qdrant/qdrant:(\S+)", f.read_text())
        assert images, f"{f.name}: no qdrant/qdrant image"
        for tag in images:
            m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", tag)
            assert m, f"{f.name}: {tag!r} is not a pinned vX.Y.Z release"
            assert m.group(1, 2) == client.group(1, 2), f"{f.name}: server {tag} vs qdrant-client {client.group(0)}"
            tags.add(tag)
    assert len(tags) == 1, f"compose files pin different server releases: {sorted(tags)}"


def test_cluster_compose_file():
    import yaml

    doc = yaml.safe_load((REPO / "docker-compose.cluster.yml").read_text())
    nodes = doc["services"]
    assert len(nodes) == 3
    for name, svc in nodes.items():
        env = svc["environment"]
        assert env["QDRANT__CLUSTER__ENABLED"] in (True, "true")
        assert "QDRANT_API_KEY" in str(env["QDRANT__SERVICE__API_KEY"])
        vol = svc["volumes"][0].split(":")[0]
        assert vol in doc["volumes"]
    assert len({svc["volumes"][0] for svc in nodes.values()}) == 3  # one volume per node
    cmds = [" ".join(svc.get("command", [])) if isinstance(svc.get("command"), list) else str(svc.get("command"))
            for svc in nodes.values()]
    first = [c for c in cmds if "--bootstrap" not in c]
    assert len(first) == 1 and "--uri" in first[0]  # one node starts the cluster, two join it
    host = re.search(r"--uri http://([\w-]+):6335", first[0]).group(1)
    assert all(f"--bootstrap http://{host}:6335" in c for c in cmds if c not in first)


# ============================================================================ the recall benchmark
def test_recall_benchmark_small_run(tmp_path, capsys):
    """A tiny run of ``python -m cbmir.benchmarks.recall``: one line per mode, exact recall 1 against an independent
    brute force, the generator deterministic and non-negative."""
    from cbmir.benchmarks.recall import main, synthetic_embeddings

    a, b = synthetic_embeddings(50, 64, seed=3), synthetic_embeddings(50, 64, seed=3)
    assert np.array_equal(a, b) and a.min() >= 0 and not np.array_equal(a, synthetic_embeddings(50, 64, seed=4))
    assert main(["--n", "3000", "--dim", "32", "--queries", "30", "--real", "none", "--modes", "exact,hnsw,exact+int8",
                 "--efs", "16,64", "--repeat", "1", "--exact-sample", "10", "--work-dir", str(tmp_path),
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "vs float64 numpy brute force on 30 queries: recall@10 1.0000" in out
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["mode"] for r in rows] == ["exact", "hnsw ef=16", "hnsw ef=64", "exact+int8"]
    assert all(0 <= r["recall"] <= 1 and r["qps"] > 0 for r in rows) and rows[0]["recall"] == 1.0
    assert "# target recall@10 >= 0.99" in out and list(tmp_path.iterdir()) == [tmp_path / "r.json"]  # cleaned up
