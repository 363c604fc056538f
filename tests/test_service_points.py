"""Living archives over HTTP (issues 14 and 16): ``POST /api/collections/{name}/points`` adds an uploaded
image (embedded once, found at rank 1 by the same image), ``DELETE .../points/{id}`` removes it; both sit
behind the API key. Collection: a small folder archive of real BreastMNIST test images (``hog``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

KEY = "points-key"


@pytest.fixture(scope="module")
def service(tmp_path_factory, data_dir):
    from fastapi.testclient import TestClient

    from cbmir.app import App, CollectionRef, load_settings, resolve_name
    from cbmir.app.ingesting import ingest_collection
    from cbmir.ingest.medmnist_data import open_medmnist
    from cbmir.service import ServiceConfig, create_app

    root = tmp_path_factory.mktemp("points")
    src = open_medmnist("breastmnist", 28, data_dir)
    batch = next(src.iter_batches("test", 40))
    for i, (img, lab) in enumerate(zip(batch.images[:30], batch.labels[:30])):
        d = root / "tiny" / ("train" if i < 24 else "test") / f"c{int(lab)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(d / f"{i:02d}.png")
    app = App(load_settings(store_path=str(root / "store"), data_dir=str(data_dir)))
    ref = CollectionRef(str(root / "tiny"), 28, "hog")
    ingest_collection(app, ref, progress=False)
    client = TestClient(create_app(app, ServiceConfig(api_key=KEY, idle_release_s=0)), raise_server_exceptions=False)
    yield client, resolve_name(ref), batch.images[35, ..., 0], app
    app.close()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_add_search_delete_over_http(service):
    client, name, new_img, app = service
    auth = {"X-API-Key": KEY}
    n0 = app.store.count(name, "train")
    files = {"file": ("new.png", _png(new_img), "image/png")}
    assert client.post(f"/api/collections/{name}/points", files=files, data={"label": "c0"}).status_code == 401
    r = client.post(f"/api/collections/{name}/points", files=files, data={"label": "c0", "meta": '{"site": "A"}'},
                    headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["embedded"] == 1 and body["points"][0]["status"] == "added"
    pid = body["points"][0]["point_id"]
    assert app.store.count(name, "train") == n0 + 1
    hit = client.post(f"/api/collections/{name}/search/image", files=files, data={"k": "1"},
                      headers=auth).json()["hits"][0]
    assert hit["point_id"] == pid and hit["score"] == pytest.approx(1.0, abs=1e-5)
    assert hit["class_name"] == "c0" and hit["payload"]["site"] == "A"
    # the same bytes again: the same point, nothing new
    again = client.post(f"/api/collections/{name}/points", files=files, data={"label": "c0", "meta": '{"site": "A"}'},
                        headers=auth).json()
    assert again["points"][0]["point_id"] == pid and app.store.count(name, "train") == n0 + 1
    assert client.delete(f"/api/collections/{name}/points/{pid}").status_code == 401
    r = client.delete(f"/api/collections/{name}/points/{pid}", headers=auth)
    assert r.status_code == 200 and r.json()["deleted"] == [pid]
    assert app.store.count(name, "train") == n0
    assert client.delete(f"/api/collections/{name}/points/{pid}", headers=auth).status_code == 404
    top = client.post(f"/api/collections/{name}/search/image", files=files, data={"k": "1"}, headers=auth).json()
    assert top["hits"][0]["point_id"] != pid


def test_bad_additions_are_4xx(service):
    client, name, new_img, _ = service
    auth = {"X-API-Key": KEY}
    png = {"file": ("x.png", _png(new_img), "image/png")}
    cases = [({"file": ("x.png", b"not an image", "image/png")}, {}, 400),
             (png, {"label": "no-such-class"}, 400),
             (png, {"split": "tset"}, 400),
             (png, {"meta": "[1, 2]"}, 400),
             (png, {"meta": '{"label": 3}'}, 400)]
    for files, data, code in cases:
        r = client.post(f"/api/collections/{name}/points", files=files, data=data, headers=auth)
        assert r.status_code == code, (data, r.status_code, r.text)
        assert "Traceback" not in r.text and "detail" in r.json()
    assert client.post("/api/collections/breastmnist_28_nope/points", files=png, headers=auth).status_code == 404
