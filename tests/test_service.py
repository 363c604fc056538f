"""The HTTP service (issue 14) through FastAPI's TestClient: every endpoint, every row of the security
table, and the same hits as ``cbmir search --json``.

Collections, built once per module: BreastMNIST 28 ``hog`` (real files), a small PNG folder archive (2D,
odd image sizes), a manifest over the same files (its own column names), a CT DICOM archive with a window,
and a 3D ``.npy`` volume stack (all ``hog``).
"""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

NAME = "breastmnist_28_hog"
KEY = "s3cret-key-for-tests"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def built(tmp_path_factory, data_dir):
    """``(store root, medmnist source, archive roots)`` with the five collections."""
    from cbmir.app import App, ArchiveOptions, CollectionRef, load_settings
    from cbmir.app.ingesting import ingest_collection
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.job import ingest
    from cbmir.ingest.medmnist_data import open_medmnist
    from cbmir.ingest.sources import open_source

    base = tmp_path_factory.mktemp("service")
    root = base / "store"
    rng = np.random.default_rng(0)
    folder = base / "shapes"
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("round", "square"):
            for i in range(n):
                p = folder / split / cls / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (30 + i, 41), dtype=np.uint8)).save(p)
    ct = base / "ct"
    from test_sources import _write_ct

    hu = {}
    for split, n in (("train", 3), ("test", 1)):
        for i in range(n):
            hu[(split, i)] = rng.integers(-600, 600, (24, 32)).astype(np.int16)
            _write_ct(ct / split / "chest" / f"{i}.dcm", hu[(split, i)], series=f"1.2.3.{int(split == 'test')}.{i}",
                      instance=1, z=0.0, window=(40, 400))
    manifest = base / "listed.csv"  # a manifest over the same files, in another folder
    rows = ["file,diagnosis,split"] + [f"{folder.name}/{p.relative_to(folder)},{p.parent.name},{p.parts[-3]}"
                                       for p in sorted(folder.rglob("*.png"))]
    manifest.write_text("\n".join(rows) + "\n")
    vols = base / "vols.npy"
    np.save(vols, rng.integers(0, 256, (5, 28, 28, 28), dtype=np.uint8))
    with App(load_settings(store_path=root, data_dir=data_dir)) as app:
        ingest_collection(app, CollectionRef(NAME.split("_")[0], 28, "hog"), progress=False)
        ingest_collection(app, CollectionRef(str(folder), 28, "hog"), progress=False)
        ingest_collection(app, CollectionRef(str(ct), 28, "hog", archive=ArchiveOptions(dicom_mode="2d")),
                          progress=False)
        ingest_collection(app, CollectionRef(str(vols), 28, "hog"), splits=("train",), progress=False)
        src = open_source(manifest, 28, path_column="file", label_column="diagnosis")
        ingest(src, make_embedder(create_extractor("hog"), size=28, is_3d=False), app.store, progress=False)
        names = app.store.list_collections()
    assert names == sorted([NAME, "shapes_28_hog", "ct_28_hog", "vols_28_hog", "listed_28_hog"]), names
    return root, open_medmnist("breastmnist", 28, data_dir), {"folder": folder, "ct": ct, "vols": vols, "hu": hu}


def _service(root, data_dir, **config):
    from fastapi.testclient import TestClient

    from cbmir.app import App, load_settings
    from cbmir.service import ServiceConfig, create_app

    app = App(load_settings(store_path=root, data_dir=data_dir))
    return app, TestClient(create_app(app, ServiceConfig(**config)), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(built, data_dir):
    app, c = _service(built[0], data_dir, idle_release_s=0)
    yield c
    app.close()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _upload(client, data: bytes, name=NAME, filename="q.png", headers=None, **form):
    return client.post(f"/api/collections/{name}/search/image", files={"file": (filename, data)},
                       data={k: str(v) for k, v in form.items()}, headers=headers or {})


# ----------------------------------------------------------------------------- endpoints
def test_health_and_collections(client, built):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["engine"] == "qdrant-edge"
    rows = {c["name"]: c for c in client.get("/api/collections").json()}
    assert set(rows) == {NAME, "shapes_28_hog", "ct_28_hog", "vols_28_hog", "listed_28_hog"}
    b = rows[NAME]
    assert (b["dataset"], b["size"], b["model"], b["dim"], b["distance"]) == ("breastmnist", 28, "hog", 1296, "cosine")
    assert b["counts"] == {"train": 546, "test": 156} and b["baseline"] is True and b["random_init"] is False
    assert b["busy"] is None
    assert b["class_names"] == {"0": "malignant", "1": "normal, benign"}
    assert rows["shapes_28_hog"]["class_names"] == {"0": "round", "1": "square"}
    assert rows["vols_28_hog"]["is_3d"] is True and rows["vols_28_hog"]["counts"] == {"train": 5}
    one = client.get(f"/api/collections/{NAME}").json()
    assert one["metadata"]["model"] == "hog" and one["metadata"]["extra"]["split_sizes"]["train"] == 546
    assert one["counts"] == b["counts"]
    page = client.get("/")
    assert page.status_code == 200  # the web page when it exists, else a pointer to /docs


def test_search_by_point_point_id_and_vector(client, built):
    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.schema import point_id

    r = client.post(f"/api/collections/{NAME}/search", json={"point": {"split": "test", "index": 7}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 5 and len(body["hits"]) == 5 and body["excluded_self"] is True
    q = body["query"]
    assert (q["kind"], q["split"], q["index"], q["point_id"]) == ("point", "test", 7, point_id("test", 7))
    labels = np.load(built[1].path)["test_labels"][:, 0]
    assert q["label"] == int(labels[7]) and q["class_name"] in ("malignant", "normal, benign")
    for h in body["hits"]:
        assert h["image_url"] == f"/api/collections/{NAME}/points/{h['point_id']}/image"
        assert h["split"] == "train" and h["payload"]["index"] == h["index"]
    # the vote summary equals an independent count of the hits' labels
    hit_labels = [h["label"] for h in body["hits"]]
    counts = {lab: hit_labels.count(lab) for lab in set(hit_labels)}
    top = max(counts.values())
    s = body["summary"]
    assert sum(s["votes"].values()) == 5 and max(s["votes"].values()) == top
    assert s["query_label_in_majority"] == (counts.get(q["label"], 0) == top)
    assert counts[s["majority_label"]] == top
    by_id = client.post(f"/api/collections/{NAME}/search", json={"point_id": point_id("test", 7)}).json()
    assert by_id["hits"] == body["hits"]
    with EdgeStore(built[0]) as s:  # shares the service's open shard (same process)
        vec = s.get_points(NAME, "test", [7])[0][0]
    by_vec = client.post(f"/api/collections/{NAME}/search", json={"vector": vec.tolist(), "k": 5}).json()
    assert [h["index"] for h in by_vec["hits"]] == [h["index"] for h in body["hits"]]
    assert by_vec["query"]["kind"] == "vector" and by_vec["summary"]["query_label_in_majority"] is None
    flt = client.post(f"/api/collections/{NAME}/search", json={"point": {"split": "test", "index": 7}, "k": 3,
                                                               "filter": {"label": [0]}}).json()
    assert [h["label"] for h in flt["hits"]] == [0, 0, 0] and flt["filter"] == {"label": [0]}


def test_same_hits_as_cli_search_json(client, built, tmp_path):
    """Stored point, an uploaded PNG of a test image and a vector: the service's hits are the CLI's."""
    from typer.testing import CliRunner

    from cbmir.cli import app as cli
    from cbmir.search.edge_store import EdgeStore

    root, src, _ = built

    def cli_hits(*args):
        r = CliRunner().invoke(cli, ["search", "--store-path", str(root), "-c", NAME, "--json", *map(str, args)])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["hits"][0]

    def service_hits(r):
        assert r.status_code == 200, r.text
        return [{k: v for k, v in h.items() if k != "image_url"} for h in r.json()["hits"]]

    img = next(src.iter_batches("test", 1, start=11)).images[0, ..., 0]
    png = tmp_path / "q.png"
    png.write_bytes(_png(img))
    with EdgeStore(root) as s:
        vec = s.get_points(NAME, "test", [11])[0][0]
    want_point = cli_hits("--query-index", 11, "--k", 6)
    assert service_hits(client.post(f"/api/collections/{NAME}/search",
                                    json={"point": {"split": "test", "index": 11}, "k": 6})) == want_point
    want_png = cli_hits("--image", png, "--k", 6)
    assert service_hits(_upload(client, png.read_bytes(), k=6)) == want_png
    # a vector: the stored test point's own vector gives the CLI's stored-point answer (a test point is not
    # in the train database, so nothing is excluded)
    assert service_hits(client.post(f"/api/collections/{NAME}/search",
                                    json={"vector": vec.tolist(), "k": 6})) == want_point
    # train point with exclude-self (default) and without
    assert service_hits(client.post(f"/api/collections/{NAME}/search",
                                    json={"point": {"split": "train", "index": 3}, "k": 4})) == \
        cli_hits("--query-index", 3, "--query-split", "train", "--k", 4)
    assert service_hits(client.post(f"/api/collections/{NAME}/search", json={
        "point": {"split": "train", "index": 3}, "k": 4, "exclude_self": False})) == \
        cli_hits("--query-index", 3, "--query-split", "train", "--k", 4, "--include-self")


def _archive_pid(root, name: str, split: str, pos: int) -> int:
    """Point id of the ``pos``-th item (sorted relative path) of an archive collection: archive ids are
    hashes of the item key (cbmir.ingest.sync), not positions."""
    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.schema import point_id

    with EdgeStore(root) as store:
        _, _, pays = store.fetch(name, split, with_vectors=False)
    pays = sorted(pays, key=lambda p: str(p.get("source_path", p.get("image_id"))))
    return point_id(split, int(pays[pos]["index"]))


def test_point_images_are_the_source_pixels(client, built):
    from cbmir.search.schema import point_id

    root, src, arch = built
    # MedMNIST: the npz row, grey replicated, at its own size
    raw = np.load(src.path)["train_images"][383]
    r = client.get(f"/api/collections/{NAME}/points/{point_id('train', 383)}/image?size=28")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(_decode(r.content), np.repeat(raw[..., None], 3, axis=2))
    big = _decode(client.get(f"/api/collections/{NAME}/points/{point_id('train', 383)}/image?size=112").content)
    assert big.shape == (112, 112, 3)
    np.testing.assert_array_equal(big[::4, ::4, 0], raw)  # enlarged by nearest neighbour: pixels kept
    # a folder archive: the file at its own resolution (not the 28 px it was embedded at)
    info = client.get("/api/collections/shapes_28_hog").json()
    assert info["metadata"]["extra"]["archive"]["path"] == str(arch["folder"].resolve())
    hits = client.post("/api/collections/shapes_28_hog/search",
                       json={"point_id": _archive_pid(root, "shapes_28_hog", "test", 0), "k": 8}).json()["hits"]
    for h in hits[:3]:
        orig = np.asarray(Image.open(arch["folder"] / h["payload"]["source_path"]))
        got = _decode(client.get(h["image_url"] + f"?size={max(orig.shape)}").content)
        np.testing.assert_array_equal(got, np.repeat(orig[..., None], 3, axis=2))
    # a manifest with its own column names: reopened as ingested, the listed file
    listed = client.post("/api/collections/listed_28_hog/search",
                         json={"point_id": _archive_pid(root, "listed_28_hog", "test", 1), "k": 2}).json()["hits"]
    for h in listed:
        orig = np.asarray(Image.open(arch["folder"].parent / h["payload"]["source_path"]))
        got = _decode(client.get(h["image_url"] + f"?size={max(orig.shape)}").content)
        np.testing.assert_array_equal(got, np.repeat(orig[..., None], 3, axis=2))
    # DICOM: the CT window (40, 400) applied to the HU values, as at ingest
    hu = arch["hu"][("train", 1)].astype(np.float64)
    want = np.clip(np.round((hu - (40 - 200)) * 255 / 400), 0, 255).astype(np.uint8)
    got = _decode(client.get(f"/api/collections/ct_28_hog/points/{_archive_pid(root, 'ct_28_hog', 'train', 1)}"
                             "/image?size=32").content)
    assert np.abs(got[..., 0].astype(int) - want).max() <= 1
    # 3D: the middle axial slice, or a montage of 16 slices in a 4 x 4 grid
    vol = np.load(arch["vols"])[2]
    pid = _archive_pid(root, "vols_28_hog", "train", 2)
    mid = _decode(client.get(f"/api/collections/vols_28_hog/points/{pid}/image?size=28").content)
    np.testing.assert_array_equal(mid, vol[14])
    mont = _decode(client.get(f"/api/collections/vols_28_hog/points/{pid}/image?size=112&view=montage").content)
    assert mont.shape == (112, 112)
    np.testing.assert_array_equal(mont[:28, :28], vol[0])
    np.testing.assert_array_equal(mont[84:, 84:], vol[27])


# ----------------------------------------------------------------------------- the security table
def test_non_loopback_bind_without_key_is_refused(built, data_dir):
    from typer.testing import CliRunner

    from cbmir.cli import app as cli
    from cbmir.core.errors import CbmirError
    from cbmir.service import check_bind, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("127.8.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org", ""))
    with pytest.raises(CbmirError, match="without an API key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "k")
    check_bind("127.0.0.1", None)
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--store-path", str(built[0])],
                           env={"CBMIR_API_KEY": ""})
    assert isinstance(r.exception, CbmirError) and "refusing to listen on '0.0.0.0'" in str(r.exception)


def test_api_key_missing_or_wrong_is_401_and_never_logged(built, data_dir, caplog):
    app, c = _service(built[0], data_dir, api_key=KEY, idle_release_s=0)
    try:
        with caplog.at_level(logging.DEBUG):
            url = f"/api/collections/{NAME}/search"
            body = {"point": {"split": "test", "index": 0}}
            assert c.post(url, json=body).status_code == 401
            wrong = c.post(url, json=body, headers={"X-API-Key": KEY[:-1] + "X"})
            assert wrong.status_code == 401 and "wrong API key" in wrong.json()["detail"]
            assert c.get("/api/collections", headers={"Authorization": "Bearer nope"}).status_code == 401
            schema = c.get("/openapi.json")  # the schema is open and declares the key
            assert schema.status_code == 200 and "APIKeyHeader" in schema.json()["components"]["securitySchemes"]
            ok = c.post(url, json=body, headers={"X-API-Key": KEY})
            assert ok.status_code == 200 and ok.headers["vary"] == "X-API-Key, Authorization"
            assert c.get("/api/collections", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
            img = c.get(ok.json()["hits"][0]["image_url"], headers={"X-API-Key": KEY})
            # a browser cache keys a cached image on the key header: never served to a request without it
            assert img.status_code == 200 and "X-API-Key" in img.headers["vary"]
            assert "X-API-Key" in wrong.headers["vary"] and "vary" not in c.get("/health").headers
            assert _upload(c, b"x").status_code == 401  # refused before the upload is read
            assert c.get("/health").status_code == 200  # shows no data
        assert KEY not in caplog.text and KEY[:-1] not in caplog.text
        assert "401" in caplog.text  # refusals are logged, without the key
    finally:
        app.close()


def test_upload_over_the_limit_is_413(built, data_dir):
    app, c = _service(built[0], data_dir, max_upload_bytes=10_000, idle_release_s=0)
    try:
        r = _upload(c, b"\0" * 20_000)
        assert r.status_code == 413 and "upload limit" in r.json()["detail"]

        def chunks():  # no Content-Length: refused as the bytes pass the limit
            for _ in range(50):
                yield b"\0" * 1000
        r = c.post(f"/api/collections/{NAME}/search/image", content=chunks(),
                   headers={"content-type": "multipart/form-data; boundary=xyz"})
        assert r.status_code == 413, r.text
        assert _upload(c, _png(np.zeros((28, 28), np.uint8))).status_code == 200  # under the limit
    finally:
        app.close()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims ``w x h`` pixels (a decompression bomb's signature; no pixel data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_bad_files_are_4xx_naming_the_problem(client):
    png = _png(np.full((28, 28), 90, np.uint8))
    nan = np.full((28, 28), 0.5, np.float32)
    nan[3, 3] = np.nan
    cases = [  # (bytes, file name, collection, words in the answer)
        (b"this is not an image", "notes.png", NAME, "not an image"),
        (png[: len(png) // 2], "cut.png", NAME, "uploaded file"),
        (_png_header_only(20_000, 20_000), "bomb.png", NAME, "decompression bomb"),
        (_npy(nan), "nan.npy", NAME, "NaN"),
        (b"", "empty.png", NAME, "empty"),
        (png, "flat.png", "vols_28_hog", "not a volume"),
        (_npy(np.zeros((28, 28, 28), np.uint8)), "vol.npy", NAME, "(H, W)"),
    ]
    for data, fname, coll, words in cases:
        r = _upload(client, data, name=coll, filename=fname)
        assert 400 <= r.status_code < 500, (fname, r.status_code, r.text)
        assert words in r.json()["detail"], (fname, r.json())
        assert "cbmir-upload-" not in r.text and "Traceback" not in r.text


def test_bad_requests_are_4xx_naming_the_valid_values(client):
    url = f"/api/collections/{NAME}/search"
    pt = {"split": "test", "index": 0}
    cases = [  # (method, path, json body, status, words)
        ("post", "/api/collections/nope_28_hog/search", {"point": pt}, 404, f"existing: {NAME}, ct_28_hog"),
        ("get", "/api/collections/nope", None, 404, "does not exist"),
        ("post", url, {"point_id": 12345}, 404, "not a point id"),
        ("post", url, {"point": {"split": "test", "index": 156}}, 404, "valid 0..155"),
        ("post", url, {"point": {"split": "tset", "index": 0}}, 400, "valid: train, val, test"),
        ("post", url, {"point": pt, "database_split": "nope"}, 400, "valid: train, val, test"),
        ("post", url, {"point": pt, "k": 0}, 400, "between 1 and 546"),
        ("post", url, {"point": pt, "k": 547}, 400, "between 1 and 546"),
        ("post", url, {"point": {"split": "train", "index": 0}, "k": 546}, 400, "between 1 and 545"),
        ("post", url, {"point": pt, "filter": {"label": {"$gt": 0}}}, 400, 'e.g. {"label": [0, 2]}'),
        ("post", url, {"point": pt, "filter": {"split": "test"}}, 400, "use database_split"),
        ("post", url, {"point": pt, "filter": {"label": [7]}}, 400, "no point matches the filter"),
        ("post", url, {"vector": [1.0, 2.0]}, 400, "(n, 1296)"),
        ("post", url, {"point": pt, "vector": [1.0]}, 400, "give exactly one query"),
        ("post", url, {"vector": [0.5] * 1296, "exclude_self": True}, 400, "exclude-self applies"),
        ("get", f"/api/collections/{NAME}/points/1099511628159/image?size=4", None, 422, "size"),
        ("get", f"/api/collections/{NAME}/points/1099511628159/image?view=montage", None, 400, "3D collections"),
        ("get", f"/api/collections/{NAME}/points/1099511628159/image?view=side", None, 422, "view"),
        ("get", f"/api/collections/{NAME}/points/99/image", None, 404, "not a point id"),
        ("get", f"/api/collections/{NAME}/points/{(1 << 40) * 3 + 999}/image", None, 404, "no point"),
    ]
    for method, path, body, status, words in cases:
        r = getattr(client, method)(path, **({"json": body} if body is not None else {}))
        assert r.status_code == status, (path, body, r.status_code, r.text)
        detail = r.json()["detail"]
        assert words in (detail if isinstance(detail, str) else json.dumps(detail)), (path, body, detail)
    bad = _upload(client, _png(np.zeros((28, 28), np.uint8)), filter="{label: 0}")
    assert bad.status_code == 400 and "is not JSON" in bad.json()["detail"]
    r = client.post(url, json={"point": pt, "k": "five"})  # wrong type: 422 naming the field
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "k"]
    r = client.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_no_client_string_reaches_the_file_system(client, built, monkeypatch):
    """Collection names from a request are matched against the store's listing before any use; names
    that try to leave the store answer 404, and the store never reads a path built from them."""
    from cbmir.search.edge_store import EdgeStore

    read = []
    orig = EdgeStore.read_meta
    monkeypatch.setattr(EdgeStore, "read_meta", lambda self, name: (read.append(name), orig(self, name))[1])
    for name in ("..%2F..%2Fetc%2Fpasswd", "..", "%2Fetc", ".locks", "x" * 300, "ct_28_hog%00", "%2e%2e"):
        for r in (client.get(f"/api/collections/{name}"),
                  client.post(f"/api/collections/{name}/search", json={"point_id": 1}),
                  client.get(f"/api/collections/{name}/points/1/image"),
                  _upload(client, b"x", name=name)):
            assert r.status_code in (404, 422), (name, r.status_code, r.text)
    assert set(read) <= {NAME, "shapes_28_hog", "ct_28_hog", "vols_28_hog", "listed_28_hog"}, read


def test_unexpected_errors_are_never_5xx_or_tracebacks(built, data_dir, monkeypatch, caplog):
    import cbmir.service.routes as routes

    app, c = _service(built[0], data_dir, idle_release_s=0)
    try:
        for exc, status in ((RuntimeError("secret internal state /srv/x"), 400), (MemoryError(), 503)):
            def boom(*a, _e=exc, **k):
                raise _e
            monkeypatch.setattr(routes, "search", boom)
            with caplog.at_level(logging.ERROR):
                r = c.post(f"/api/collections/{NAME}/search", json={"point_id": 1})
            assert r.status_code == status, r.text
            assert "error " in r.json()["detail"] and "secret" not in r.text and "Traceback" not in r.text
            assert "Traceback" in caplog.text or "RuntimeError" in caplog.text or "MemoryError" in caplog.text
    finally:
        app.close()


def test_health_is_503_when_the_store_cannot_be_reached(built, data_dir, tmp_path):
    from fastapi.testclient import TestClient

    from cbmir.app import App, load_settings
    from cbmir.service import ServiceConfig, create_app

    app = App(load_settings(qdrant_url="http://127.0.0.1:9", qdrant_retry_s=0, qdrant_timeout_s=1))
    try:
        c = TestClient(create_app(app, ServiceConfig(idle_release_s=0)), raise_server_exceptions=False)
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable", r.text
        assert c.get("/api/collections").status_code == 503
    finally:
        app.close()


def test_vote_summary_follows_mv_at_k():
    """The DESIGN.md §2 worked examples: MV@5 = 1, 1 (tie), 0."""
    from cbmir.app.searching import Hit
    from cbmir.app.summary import vote_summary

    def hits(labels):
        return [Hit(i + 1, i, "train", i, lab, f"c{lab}", 0.0, {}) for i, lab in enumerate(labels)]

    s = vote_summary(hits([1, 1, 0, 1, 0]), 1)
    assert (s.majority_label, s.votes, s.query_label_in_majority) == (1, {"c1": 3, "c0": 2}, True)
    s = vote_summary(hits([0, 2, 1, 2, 0]), 2)  # 0 and 2 tie: the best-ranked tied label is the majority
    assert (s.majority_label, s.tied_labels, s.query_label_in_majority) == (0, [0, 2], True)
    assert vote_summary(hits([0, 0, 0, 2, 2]), 1).query_label_in_majority is False
    assert vote_summary(hits([-1, -1]), None).majority_label is None
    assert vote_summary(hits([3]), None).query_label_in_majority is None


def test_cli_gallery(built, tmp_path, data_dir):
    from typer.testing import CliRunner

    from cbmir.cli import app as cli

    out = tmp_path / "g.png"
    r = CliRunner().invoke(cli, ["search", "--store-path", str(built[0]), "-c", NAME, "--query-index", "3",
                                 "--k", "4", "--gallery", str(out)], env={"CBMIR_DATA_DIR": str(data_dir)})
    assert r.exit_code == 0, r.output
    img = _decode(out.read_bytes())
    assert img.ndim == 3 and img.shape[1] > 3 * img.shape[0]  # five tiles side by side
    # the table ends with the same class vote as the service's summary
    labels = [ln.split()[2] for ln in r.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(labels) == 4
    n1 = labels.count("1")
    want = f"vote: {max(n1, 4 - n1)} " + ("normal, benign" if n1 > 4 - n1 else "malignant")  # ties: label 0 first
    assert any(ln.startswith(want) for ln in r.stdout.splitlines()), r.stdout
    r = CliRunner().invoke(cli, ["search", "--store-path", str(built[0]), "-c", NAME, "--query-index", "3",
                                 "--gallery", str(tmp_path / "no" / "g.png")])
    assert r.exit_code != 0 and "does not exist" in str(r.exception)
