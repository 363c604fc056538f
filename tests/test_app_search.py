"""One application layer: the CLI (``cbmir search --json``) and :class:`cbmir.client.SearchClient` give the
same answer to the same search — hits, or the same error — and both equal a numpy brute force.

Collection: BreastMNIST 28 with HOG (real files), built once per module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cbmir.core.errors import CbmirError

NAME = "breastmnist_28_hog"


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_dir):
    """``(store_path, source)``: a complete breastmnist_28_hog collection on the embedded engine."""
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.job import ingest
    from cbmir.ingest.medmnist_data import open_medmnist
    from cbmir.search.edge_store import EdgeStore

    root = tmp_path_factory.mktemp("app") / "store"
    src = open_medmnist("breastmnist", 28, data_dir)
    with EdgeStore(root) as s:
        ingest(src, make_embedder(create_extractor("hog"), size=28, is_3d=False), s, progress=False)
    return root, src


@pytest.fixture
def client(built):
    from cbmir.client import SearchClient
    from cbmir.search.edge_store import EdgeStore

    c = SearchClient(EdgeStore(built[0]))
    yield c
    c.close()


def _cli(store, *args):
    """``cbmir search --json`` through the console entry point; ``(hits as JSON, error line or None)``."""
    from typer.testing import CliRunner

    from cbmir.cli import app

    r = CliRunner().invoke(app, ["search", "--store-path", str(store), "--json", *map(str, args)])
    if isinstance(r.exception, CbmirError):
        return None, str(r.exception)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["hits"], None


def _client(fn):
    """``(hits as JSON, error or None)`` of a client call, in the CLI's JSON form."""
    from dataclasses import asdict

    try:
        return json.loads(json.dumps([[asdict(h) for h in q] for q in fn()])), None
    except CbmirError as e:
        return None, str(e)


def _brute(vectors: np.ndarray, q: np.ndarray, k: int, exclude: int | None = None) -> list[int]:
    """Cosine top-k rows by float64 numpy, ties by lower row (independent of the store)."""
    x = vectors.astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    s = x @ (q / np.linalg.norm(q))
    if exclude is not None:
        s[exclude] = -np.inf
    return sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]


def _png(tmp_path, img: np.ndarray):
    p = tmp_path / "query.png"
    Image.fromarray(img).save(p)
    return p


def test_cli_and_client_agree(built, client, tmp_path):
    store, src = built
    test_img = next(src.iter_batches("test", 1, start=7)).images[0, ..., 0]  # (28, 28) uint8
    png = _png(tmp_path, test_img)
    _, db_vecs, _ = client.store.fetch(NAME, "train")
    q_vec = client.store.get_points(NAME, "test", [7])[0][0]
    cases = [
        # (CLI args, client call)
        (("-c", NAME, "--query-index", 7, "--k", 5),
         lambda: client.search_by_point(NAME, 7, split="test", k=5)),
        (("-c", NAME, "--query-index", 3, "--query-split", "train", "--k", 4),  # exclude-self by default
         lambda: client.search_by_point(NAME, 3, split="train", k=4)),
        (("-c", NAME, "--query-index", 3, "--query-split", "train", "--include-self", "--k", 4),
         lambda: client.search_by_point(NAME, 3, split="train", k=4, exclude_self=False)),
        (("-c", NAME, "--image", png, "--k", 5),
         lambda: client.search_by_image(NAME, png, k=5)),
        (("-c", NAME, "--image", png, "--k", 5),
         lambda: client.search_by_image(NAME, test_img, k=5)),  # the array: same pixels, same answer
        (("-c", NAME, "--query-index", 7, "--k", 547),  # k above the database size: the same error
         lambda: client.search_by_point(NAME, 7, split="test", k=547)),
        (("-c", NAME, "--query-index", 3, "--query-split", "train", "--k", 546),  # 545 left after exclusion
         lambda: client.search_by_point(NAME, 3, split="train", k=546)),
        (("-c", NAME, "--image", png, "--exclude-self"),
         lambda: client.search(__import__("cbmir.app", fromlist=["SearchRequest"]).SearchRequest(
             NAME, files=[png], exclude_self=True)).hits),
        (("-c", NAME, "--query-index", 7, "--filter", '{"label": [0]}', "--k", 5),
         lambda: client.search_by_point(NAME, 7, split="test", k=5, filter={"label": [0]})),
        (("-c", NAME, "--query-index", 7, "--distance", "euclidean"),
         lambda: client.search(__import__("cbmir.app", fromlist=["SearchRequest"]).SearchRequest(
             NAME, points=[("test", 7)], distance="euclidean")).hits),
    ]
    for args, call in cases:
        cli_hits, cli_err = _cli(store, *args)
        api_hits, api_err = _client(call)
        assert cli_err == api_err, args
        assert cli_hits == api_hits, args
    # by vector: the client's answer equals the stored-point answer and a numpy brute force
    by_vec = client.search_by_vector(NAME, q_vec, k=5)[0]
    assert [h.index for h in by_vec] == [h["index"] for h in _cli(store, "-c", NAME, "--query-index", 7)[0][0]]
    assert [h.index for h in by_vec] == _brute(db_vecs, q_vec.astype(np.float64), 5)
    # exclude-self rows equal the brute force with the query's own row removed
    own = client.store.get_points(NAME, "train", [3])[0][0].astype(np.float64)
    assert [h.index for h in client.search_by_point(NAME, 3, split="train", k=4)[0]] == _brute(db_vecs, own, 4, 3)
    assert client.search_by_point(NAME, 3, split="train", k=1, exclude_self=False)[0][0].index == 3


def test_errors_name_the_input(client):
    msgs = {
        "k 0": lambda: client.search_by_point(NAME, 0, k=0),
        "k 547 is out of range": lambda: client.search_by_point(NAME, 0, k=547),
        "between 1 and 545": lambda: client.search_by_point(NAME, 0, split="train", k=546),
        "query index 156 is out of range": lambda: client.search_by_point(NAME, 156),
        "unknown query split 'tset'": lambda: client.search_by_point(NAME, 0, split="tset"),
        "unknown split 'nope'": lambda: client.search_by_point(NAME, 0, database_split="nope"),
        "does not exist": lambda: client.search_by_point("nope_28_hog", 0),
        "no point matches the filter": lambda: client.search_by_point(NAME, 0, filter={"label": [7]}),
        "filter field 'split'": lambda: client.search_by_point(NAME, 0, filter={"split": "test"}),
        "ranks by cosine distance, not euclidean": lambda: client.search(
            __import__("cbmir.app", fromlist=["SearchRequest"]).SearchRequest(
                NAME, vectors=np.ones(1296, np.float32), distance="euclidean")),
        "must have shape (n, 1296)": lambda: client.search_by_vector(NAME, np.ones(10, np.float32)),
        "beyond float32's": lambda: client.search_by_vector(NAME, [1e39] * 1296),
        "numeric array": lambda: client.search_by_image(NAME, np.array([["a"]])),
        "not found": lambda: client.search_by_image(NAME, "/nonexistent/x.png"),
    }
    import warnings

    for word, call in msgs.items():
        with pytest.raises(CbmirError, match=__import__("re").escape(word)), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # refused with a message, not an overflow warning
            call()


def test_filter_is_exact_and_applied_inside_the_search(client):
    """A label filter returns the brute-force top-k among the database points of that label only."""
    idx, vecs, pays = client.store.fetch(NAME, "train")
    labels = np.asarray([p["label"] for p in pays])
    q = client.store.get_points(NAME, "test", [11])[0][0].astype(np.float64)
    for lab in (0, 1):
        rows = np.flatnonzero(labels == lab)
        want = [int(rows[i]) for i in _brute(vecs[rows], q, 6)]
        got = client.search_by_point(NAME, 11, k=6, filter={"label": lab})[0]
        assert [h.index for h in got] == want
        assert {h.label for h in got} == {lab}
    assert [h.index for h in client.search_by_point(NAME, 11, k=6, filter={"label": [0, 1]})[0]] == \
        _brute(vecs, q, 6)


def test_grey_batch_and_class_names(client, built):
    """A grey batch ``(B, H, W)`` (MedMNIST's own layout) is B queries; hits carry class names."""
    _, src = built
    batch = next(src.iter_batches("test", 3, start=0)).images[..., 0]  # (3, 28, 28)
    many = client.search_by_image(NAME, batch, k=5)
    assert len(many) == 3
    for i in range(3):
        one = client.search_by_image(NAME, batch[i], k=5)[0]
        assert [h.index for h in many[i]] == [h.index for h in one]
    with pytest.raises(CbmirError, match="batch of 3D volumes"):
        client.search_by_image(NAME, np.zeros((2, 28, 28, 28), np.uint8))
    hit = many[0][0]
    assert hit.class_name in ("malignant", "normal, benign")
    assert hit.rank == 1 and hit.split == "train"
