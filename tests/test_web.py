"""The web page of ``cbmir serve`` (issue 15) in a real browser: headless Chromium (Debian's ``chromium``)
driven by Playwright, against the service running in this process (uvicorn on 127.0.0.1, a free port) over
real collections: BreastMNIST 28 ``hog`` (the handcrafted baseline), BreastMNIST 28 ``resnet50`` with random
weights (RANDOM-INIT) and a small manifest archive whose class names are HTML.

A second service over the same store runs with an API key: the page must ask for it, send it only as the
``X-API-Key`` header of /api requests, keep it only in the tab's sessionStorage, and load the point images
with it (object URLs). Every result the page shows is checked against a float64 numpy brute force over the
stored vectors.
``CBMIR_WEB_SCREENSHOTS=DIR`` also saves the two screenshots of ``docs/`` (search result, side by side).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[test]'")

HOG = "breastmnist_28_hog"
RAND = "breastmnist_28_resnet50_randinit"
#: class names of the archive that must show as text, never as markup
BOLD, SCRIPT = "<b>x</b>", "<script>window.__xss = 1</script>"
EVIL_FILE = "<img src=x onerror=window.__xss=2>.png"
TIMEOUT_MS = 60_000  # per browser action; the first upload to a CNN collection builds the model
SHOTS = os.environ.get("CBMIR_WEB_SCREENSHOTS")
#: the key of the keyed service; it must never show up in a URL, a cookie, localStorage, the page or the console
KEY = "pg-Key_7f3a9c-not-in-urls"


# ----------------------------------------------------------------------------------------- fixtures
def _manifest_archive(root: Path, data_dir: Path) -> Path:
    """A manifest archive of 24 BreastMNIST images (train 18, test 6) labelled with HTML class names; one
    file name is an HTML tag too. Returns the CSV path."""
    with np.load(data_dir / "breastmnist.npz") as z:
        imgs = {"train": z["train_images"][:18], "test": z["test_images"][:6]}
    from PIL import Image

    rows = ["path,label,split"]
    for split, arr in imgs.items():
        for i, img in enumerate(arr):
            name = EVIL_FILE if (split, i) == ("train", 0) else f"{split}_{i:02d}.png"
            Image.fromarray(img).save(root / name)
            label = BOLD if i % 2 else SCRIPT
            rows.append(f'"{name}","{label}",{split}')
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    return root / "cases.csv"


@pytest.fixture(scope="module")
def collections(tmp_path_factory, data_dir):
    """``(settings, {name: (train_vectors, train_labels, test_vectors, test_labels, class_names, test_indices,
    train_payloads)}, html_name)``, rows in stored order (archive rows are hashes of the item key).

    The collections are ingested through the application layer (as ``cbmir ingest`` does)."""
    from cbmir.app import App, ArchiveOptions, CollectionRef, load_settings, resolve_name
    from cbmir.app.collections import class_names
    from cbmir.app.ingesting import ingest_collection

    root = tmp_path_factory.mktemp("web")
    archive = root / "archive"
    archive.mkdir()
    csv = _manifest_archive(archive, data_dir)
    html_ref = CollectionRef(str(csv), 28, "hog", archive=ArchiveOptions(source="manifest", name="htmlcases"))
    refs = [CollectionRef("breastmnist", 28, "hog"), CollectionRef("breastmnist", 28, "resnet50", random_init=True),
            html_ref]
    settings = load_settings(store_path=str(root / "store"), data_dir=str(data_dir), threads=1)
    out = {}
    with App(settings) as app:
        for ref in refs:
            ingest_collection(app, ref, progress=False, download=False)
            name = resolve_name(ref)
            vecs, idx, pay = {}, {}, {}
            for split in ("train", "test"):
                idx[split], v, pay[split] = app.store.fetch(name, split)
                vecs[split] = (v.astype(np.float64), np.array([p["label"] for p in pay[split]]))
            out[name] = (*vecs["train"], *vecs["test"], class_names(app.store.meta(name)), idx["test"], pay["train"])
    assert {HOG, RAND} <= set(out)
    return settings, out, resolve_name(html_ref)


@pytest.fixture(scope="module")
def app_ctx(collections):
    """The application context both services share (closed after them)."""
    from cbmir.app import App

    ctx = App(collections[0])
    yield ctx
    ctx.close()


@contextmanager
def _serving(app_ctx, **config):
    """Base URL of ``cbmir serve``'s app over ``app_ctx`` (``ServiceConfig(**config)``, 1 MB uploads), run by
    uvicorn in a thread on 127.0.0.1 and a free port."""
    import uvicorn

    from cbmir.service import ServiceConfig, create_app

    api = create_app(app_ctx, ServiceConfig(max_upload_bytes=1024 * 1024, idle_release_s=0, **config))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start within 30 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def service(app_ctx):
    """Base URL of the service without an API key."""
    with _serving(app_ctx) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_service(app_ctx):
    """Base URL of the service started with ``--api-key KEY``."""
    with _serving(app_ctx, api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def browser_context():
    """A headless Chromium with a fresh profile (``--user-data-dir``), no network beyond loopback needed."""
    profile = tempfile.mkdtemp(prefix="cbmir-chromium-")
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, viewport={"width": 1280, "height": 800},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"])
        ctx.set_default_timeout(TIMEOUT_MS)
        yield ctx
        ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def _tab(browser_context, base: str):
    """A fresh tab on ``base`` that records its requests (``.requests``) and console messages
    (``.console``); fails the test on any uncaught script error of the page."""
    p = browser_context.new_page()
    p.set_viewport_size({"width": 1280, "height": 800})
    errors = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.requests, p.console = [], []
    p.on("request", lambda req: p.requests.append(req))
    p.on("console", lambda msg: p.console.append(msg.text))
    p.base = base
    try:
        yield p
    finally:
        p.close()
    assert not errors, f"script errors on the page: {errors}"


@pytest.fixture
def page(browser_context, service):
    """A fresh tab on the service without a key."""
    with _tab(browser_context, service) as p:
        yield p


@pytest.fixture
def keyed_page(browser_context, keyed_service):
    """A fresh tab (empty sessionStorage) on the service that needs ``KEY``."""
    with _tab(browser_context, keyed_service) as p:
        yield p


# ----------------------------------------------------------------------------------------- helpers
def _until(page, expression: str, timeout_s: float = TIMEOUT_MS / 1000) -> None:
    """Poll the JS ``expression`` until it is truthy (``page.wait_for_function`` evaluates strings in a way
    the page's Content-Security-Policy forbids)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true within {timeout_s:.0f} s: {expression}"
        time.sleep(0.1)


def _n_hits(scope, n: int) -> None:
    """Wait until ``scope`` shows ``n`` hits."""
    sync_api.expect(scope.locator("[data-hit-rank]")).to_have_count(n, timeout=TIMEOUT_MS)


def _open(page, query: str = ""):
    page.goto(f"{page.base}/{query}")
    page.wait_for_selector("body[data-ready=true]")


def _brute(collection, q: np.ndarray, k: int, labels: set[int] | None = None) -> list[int]:
    """Cosine top-k train rows by float64 numpy, ties by lower row (independent of the store)."""
    db, db_labels = collection[0], collection[1]
    x = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-300)
    s = x @ (q / np.linalg.norm(q))
    if labels is not None:
        s[~np.isin(db_labels, list(labels))] = -np.inf
    return sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]


def _expected(collection, q: np.ndarray, k: int, labels=None) -> list[tuple[str, str]]:
    """``(class name, score text)`` of the brute-force top-k, as the page writes them."""
    db, db_labels, names = collection[0], collection[1], collection[4]
    out = []
    for i in _brute(collection, q, k, labels):
        s = float(db[i] @ q / (np.linalg.norm(db[i]) * np.linalg.norm(q)))
        out.append((names[int(db_labels[i])], f"similarity {s:.3f}"))
    return out


def _hits(scope) -> list[str]:
    """Texts of the rendered hits of ``scope`` in rank order (their ``data-hit-rank`` must be 1..k)."""
    items = scope.locator("[data-hit-rank]")
    ranks = [items.nth(i).get_attribute("data-hit-rank") for i in range(items.count())]
    assert ranks == [str(r) for r in range(1, len(ranks) + 1)]
    return [" ".join(items.nth(i).inner_text().split()) for i in range(items.count())]


def _assert_hits(scope, expected: list[tuple[str, str]]) -> None:
    texts = _hits(scope)
    assert len(texts) == len(expected)
    for text, (name, score) in zip(texts, expected):
        assert name in text and score in text, (text, name, score)


def _assert_images_loaded(page) -> None:
    """Every image has an alt text and was decoded (the image endpoint answered a PNG; the page fetched
    it and shows it through an object URL); none failed to load."""
    _until(page, "!document.querySelector('img[data-pending]') && [...document.images].every((i) => i.complete)")
    failed = page.locator("[data-image-failed]")
    assert failed.count() == 0, failed.first.get_attribute("title")
    imgs = page.evaluate("[...document.images].map((i) => [i.alt, i.naturalWidth, i.getAttribute('src')])")
    assert imgs
    for alt, width, src in imgs:
        assert alt.strip() and width > 0, (alt, width, src)


def _screenshot(page, name: str) -> None:
    """With ``CBMIR_WEB_SCREENSHOTS=DIR``: a 1280x800 PNG of the page, reduced to a 128-colour palette."""
    if not SHOTS:
        return
    from PIL import Image

    out = Path(SHOTS) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    Image.open(out).convert("RGB").quantize(128).save(out, optimize=True)


def _png(tmp_path: Path, data_dir: Path, index: int) -> Path:
    from PIL import Image

    with np.load(data_dir / "breastmnist.npz") as z:
        img = z["test_images"][index]
    path = tmp_path / f"query_{index}.png"
    Image.fromarray(img).save(path)
    return path


# ----------------------------------------------------------------------------------------- tests
def test_upload_a_png_shows_k_hits_with_class_names(page, collections, tmp_path, data_dir):
    """Choose a collection, set k, upload a PNG: k hits in rank order, each with the class name and score
    of the brute-force top-k (the PNG holds test image 12, so its HOG vector is the stored one); then drop
    another PNG (test image 40) on the drop zone."""
    hog = collections[1][HOG]
    _open(page)
    page.select_option("#collection", RAND)  # not the first choice: the page must follow the select
    page.select_option("#collection", HOG)
    info = page.locator("#collection-info")
    assert "BASELINE" in info.inner_text() and "RANDOM-INIT" not in info.inner_text()
    assert "702" in info.inner_text()  # 546 train + 156 test images
    page.fill("#k", "4")
    page.locator("#k").dispatch_event("change")
    page.set_input_files("#query-file", str(_png(tmp_path, data_dir, 12)))
    _n_hits(page, 4)
    _assert_hits(page, _expected(hog, hog[2][12], 4))
    query = page.locator("[data-query]")
    assert query.is_visible() and "query_12.png" in query.inner_text()
    assert "Class unknown" in query.inner_text()  # an upload has no label: no ✓/✗
    assert page.locator(".mark").count() == 0
    names = [n for n, _ in _expected(hog, hog[2][12], 4)]
    top = Counter(names).most_common(1)[0]
    assert f"{top[0]}: {top[1]}" in page.locator(".summary").inner_text()
    _assert_images_loaded(page)
    assert page.locator("[role=alert]").count() == 0
    # drag-and-drop of another PNG onto the drop zone searches with it
    png = _png(tmp_path, data_dir, 40)
    page.evaluate("""([bytes, name]) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
        document.getElementById("dropzone").dispatchEvent(
            new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
    }""", [list(png.read_bytes()), png.name])
    sync_api.expect(page.locator("[data-query]")).to_contain_text(png.name, timeout=TIMEOUT_MS)
    page.wait_for_selector("#results:not([aria-busy])", state="attached")
    _assert_hits(page, _expected(hog, hog[2][40], 4))


def test_deep_link_shows_the_stored_query_and_its_marks(page, collections):
    """Opening ``/?collection=...&split=test&index=0&k=5`` shows that result: the query's class, the
    brute-force top-5, ✓/✗ against the query's label and the majority vote with its counts."""
    hog = collections[1][HOG]
    _open(page, f"?collection={HOG}&split=test&index=0&k=5")
    _n_hits(page, 5)
    expected = _expected(hog, hog[2][0], 5)
    _assert_hits(page, expected)
    q_name = hog[4][int(hog[3][0])]
    assert q_name in page.locator("[data-query]").inner_text()
    marks = [t.strip()[0] for t in page.locator(".mark").all_inner_texts()]
    assert marks == ["✓" if n == q_name else "✗" for n, _ in expected]
    votes = Counter(n for n, _ in expected)
    summary = page.locator(".summary").inner_text()
    for name, n in votes.items():
        assert f"{name}: {n}" in summary
    assert ("is in the majority" in summary) == (votes[q_name] == max(votes.values()))
    _assert_images_loaded(page)
    assert page.evaluate("location.search") == f"?collection={HOG}&split=test&index=0&k=5"
    # no key configured: no key form, no "Forget key", no key sent
    assert page.locator("#key-form").is_hidden() and page.locator("#forget-key").is_hidden()
    assert not [r.url for r in page.requests if "x-api-key" in r.all_headers()]
    _screenshot(page, "webpage-search.png")


def test_k_and_label_filter_in_the_link_and_the_form(page, collections):
    """``&label=1&k=4`` gives the brute-force top-4 among label 1; unticking the filter in the form re-runs
    the query without it and writes the new state into the URL."""
    hog = collections[1][HOG]
    _open(page, f"?collection={HOG}&split=test&index=5&k=4&label=1")
    _n_hits(page, 4)
    _assert_hits(page, _expected(hog, hog[2][5], 4, labels={1}))
    box = page.locator("#label-boxes input[value='1']")
    assert box.is_checked()
    box.uncheck()
    assert "label=" not in page.evaluate("location.search")
    page.wait_for_selector("#results:not([aria-busy])", state="attached")
    _assert_hits(page, _expected(hog, hog[2][5], 4))


def test_bad_uploads_show_a_readable_alert(page, tmp_path):
    """A file that is not an image, and one over the upload limit, each show a role=alert message from the
    API (never a 5xx), and no hits."""
    _open(page)
    page.select_option("#collection", HOG)
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    page.set_input_files("#query-file", str(bad))
    alert = page.locator("[role=alert]")
    alert.wait_for()
    text = alert.inner_text()
    assert "Error" in text and "image" in text and "HTTP 5" not in text, text
    assert page.locator("[data-hit-rank]").count() == 0
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * 1024))  # over the 1 MB limit of this service
    page.set_input_files("#query-file", str(big))
    sync_api.expect(page.locator("[role=alert]")).to_contain_text("too large", timeout=TIMEOUT_MS)
    # an unknown collection in a link is named, with the valid ones
    _open(page, "?collection=nope_28_hog&split=test&index=0")
    assert "nope_28_hog" in page.locator("[role=alert]").inner_text()


def test_side_by_side_shows_two_result_rows(page, collections):
    """Comparing HOG with a random-init CNN for the same stored query: two rows, each its own brute force."""
    cols = collections[1]
    _open(page)
    page.select_option("#collection", HOG)
    page.check("#compare-on")
    page.select_option("#compare", RAND)
    assert "RANDOM-INIT" in page.locator("#compare-info").inner_text()
    page.select_option("#split", "test")
    page.fill("#index", "3")
    page.click("#search-stored")
    sync_api.expect(page.locator("#rows .row-result")).to_have_count(2, timeout=TIMEOUT_MS)
    _n_hits(page, 10)
    rows = page.locator("#rows .row-result")
    for i, name in enumerate((HOG, RAND)):
        assert rows.nth(i).get_attribute("data-collection") == name
        _assert_hits(rows.nth(i), _expected(cols[name], cols[name][2][3], 5))
    assert "RANDOM-INIT" in rows.nth(1).inner_text() and "BASELINE" in rows.nth(0).inner_text()
    assert f"compare={RAND}" in page.evaluate("location.search")
    _assert_images_loaded(page)
    _screenshot(page, "webpage-compare.png")
    # reloading the link shows the same two rows
    page.reload()
    sync_api.expect(page.locator("#rows .row-result")).to_have_count(2, timeout=TIMEOUT_MS)
    _n_hits(page, 10)


def test_html_in_class_names_and_payload_shows_as_text(page, collections):
    """Class names ``<b>x</b>`` and ``<script>...`` and a file name ``<img onerror=...>`` are shown as
    typed, in the hits, the vote, the label filter and the payload view; no injected markup runs."""
    _, cols, html_name = collections
    col = cols[html_name]
    assert set(col[4].values()) == {BOLD, SCRIPT}
    _open(page, f"?collection={html_name}&split=test&index={int(col[5][1])}&k=18")
    _n_hits(page, 18)
    _assert_hits(page, _expected(col, col[2][1], 18))
    assert BOLD in page.locator("[data-query]").inner_text()
    assert SCRIPT in page.locator("#label-boxes").inner_text()
    assert page.locator("#results b, #results script, #controls b, #results img[src='x']").count() == 0
    evil_index = next(p["index"] for p in col[6] if EVIL_FILE in str(p.get("source_path", "")))
    evil = page.locator("[data-hit-rank]").filter(has=page.locator(f"img[alt*='train #{evil_index},']"))
    evil.locator("button").click()
    dialog = page.locator("#detail")
    dialog.wait_for(state="visible")
    assert EVIL_FILE in dialog.inner_text()
    assert dialog.locator("img[src='x']").count() == 0
    assert page.evaluate("window.__xss") is None


def test_keyboard_only_search_and_detail_view(page, collections):
    """Tab to 'Random query', Enter: hits appear and the URL holds the drawn index; Tab to the first hit,
    Enter: the larger view with the payload opens; Escape closes it."""
    _open(page, f"?collection={HOG}")
    focused = lambda: page.evaluate("document.activeElement.id || document.activeElement.className")  # noqa: E731
    for _ in range(40):
        page.keyboard.press("Tab")
        if focused() == "random":
            break
    assert focused() == "random"
    page.keyboard.press("Enter")
    _n_hits(page, 5)
    index = int(re.search(r"index=(\d+)", page.evaluate("location.search")).group(1))
    hog = collections[1][HOG]
    _assert_hits(page, _expected(hog, hog[2][index], 5))
    for _ in range(40):
        page.keyboard.press("Tab")
        if focused() == "hit":
            break
    assert page.evaluate("document.activeElement.closest('[data-hit-rank]')?.dataset.hitRank") == "1"
    page.keyboard.press("Enter")
    dialog = page.locator("#detail")
    dialog.wait_for(state="visible")
    assert "payload.image_id" in dialog.inner_text()
    assert dialog.locator("img").get_attribute("alt")
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")


@pytest.mark.parametrize("width", [1280, 400])
def test_readable_wide_and_narrow(page, width):
    """At 1280x800 the settings stand beside the results; in a 400 px window they stack, and nothing is
    wider than the window."""
    page.set_viewport_size({"width": width, "height": 800})
    _open(page, f"?collection={HOG}&compare={RAND}&split=test&index=2&k=5")
    _n_hits(page, 10)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    controls, results = page.locator("#controls").bounding_box(), page.locator("#results").bounding_box()
    if width >= 900:
        assert controls["x"] + controls["width"] <= results["x"]
        first = page.locator("[data-hit-rank='1']").first.bounding_box()
        assert first["y"] + first["height"] <= 800  # the first hits are visible without scrolling
    else:
        assert controls["y"] + controls["height"] <= results["y"]


# ----------------------------------------------------------------------------------------- with an API key
def _enter_key(page, key: str) -> None:
    """Wait for the key form, check it has the focus, type ``key`` and press Enter (keyboard only)."""
    form = page.locator("#key-form")
    form.wait_for(state="visible")
    assert "This service needs an API key" in form.inner_text()
    assert page.evaluate("document.activeElement.id") == "api-key"
    assert page.locator("#api-key").get_attribute("type") == "password"
    assert page.locator("label[for=api-key]").inner_text().strip() == "API key"
    page.keyboard.type(key)
    page.keyboard.press("Enter")


def _status(response) -> int | None:
    return response.status if response is not None else None


def _api_requests(page) -> list[tuple[str, str | None, int | None]]:
    """``(url, X-API-Key sent, status)`` of the tab's ``/api/`` requests so far, in order."""
    return [(r.url, r.all_headers().get("x-api-key"), _status(r.response()))
            for r in page.requests if "/api/" in r.url]


def _blob_images(page, scope: str = "#results") -> list[str]:
    """The ``blob:`` sources of the images in ``scope``."""
    return page.evaluate("(scope) => [...document.querySelectorAll(`${scope} img`)].map((i) => i.src)"
                         ".filter((s) => s.startsWith('blob:'))", scope)


def _loads(page, urls: list[str]) -> list[bool]:
    """Whether each object URL still loads as an image (False once revoked)."""
    return page.evaluate("""(urls) => Promise.all(urls.map((u) => new Promise((done) => {
        const img = new Image(); img.onload = () => done(true); img.onerror = () => done(false); img.src = u;
    })))""", urls)


def _assert_key_kept_private(page, browser_context) -> None:
    """The key is in this tab's sessionStorage only: not in any URL requested, localStorage, a cookie, the
    page's markup or the console; it went out as ``X-API-Key`` on /api requests only."""
    enc_key = urllib.request.quote(KEY)
    assert not [r.url for r in page.requests if KEY in r.url or enc_key in r.url]
    assert KEY in page.evaluate("JSON.stringify(Object.assign({}, sessionStorage))")
    assert KEY not in page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
    assert KEY not in page.evaluate("document.cookie")
    assert not [c for c in browser_context.cookies() if KEY in c["value"] or KEY in c["name"]]
    assert KEY not in page.content() and page.locator("#api-key").input_value() == ""
    assert not [m for m in page.console if KEY in m]
    assert not [r.url for r in page.requests if "/api/" not in r.url and "x-api-key" in r.all_headers()]


def test_api_key_form_then_results_with_images(keyed_page, collections, browser_context):
    """With ``--api-key``: the first API call answers 401 and the page shows the key form (focused, no
    "wrong" message); after the key is typed, the deep link's search runs and shows the brute-force top-5
    with every image decoded (fetched with the key, shown through blob: URLs). Every /api request after
    the key carries it as ``X-API-Key`` and is answered 200; the key appears nowhere else. A second
    search revokes the first one's object URLs; a reload keeps the key (same tab)."""
    page = keyed_page
    hog = collections[1][HOG]
    page.goto(f"{page.base}/?collection={HOG}&split=test&index=7&k=5")
    _enter_key(page, KEY)
    assert page.locator("#key-message").is_hidden()
    page.wait_for_selector("body[data-ready=true]")
    _n_hits(page, 5)
    _assert_hits(page, _expected(hog, hog[2][7], 5))
    _assert_images_loaded(page)
    assert page.locator("#key-form").is_hidden() and page.locator("#forget-key").is_visible()
    first = _blob_images(page)
    assert len(first) == 6  # the query and its 5 hits
    calls = _api_requests(page)
    assert calls[0][1:] == (None, 401)  # GET /api/collections without a key
    assert all(key == KEY and status == 200 for _, key, status in calls[1:]), calls
    assert sum("/points/" in url and url.split("?")[0].endswith("/image") for url, _, _ in calls) >= 6
    _assert_key_kept_private(page, browser_context)
    # the larger view loads with the key too
    page.locator("[data-hit-rank='1'] button").click()
    page.locator("#detail").wait_for(state="visible")
    _assert_images_loaded(page)
    large = _blob_images(page, "#detail")
    assert len(large) == 1
    page.keyboard.press("Escape")
    page.locator("#detail").wait_for(state="hidden")
    deadline = time.monotonic() + 10  # the dialog's close event (which revokes its object URL) is queued
    while _loads(page, large) != [False]:
        assert time.monotonic() < deadline, "closing the larger view did not revoke its object URL"
        time.sleep(0.1)
    # another search: new images, the old object URLs revoked
    page.fill("#index", "8")
    page.click("#search-stored")
    sync_api.expect(page.locator("[data-query]")).to_contain_text("#8", timeout=TIMEOUT_MS)
    _assert_hits(page, _expected(hog, hog[2][8], 5))
    _assert_images_loaded(page)
    assert not set(first) & set(_blob_images(page))
    assert _loads(page, first) == [False] * len(first)
    assert all(_loads(page, _blob_images(page)))
    # the key stays for this tab: a reload searches again without asking
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    _n_hits(page, 5)
    assert page.locator("#key-form").is_hidden()
    _assert_key_kept_private(page, browser_context)


def _wrong_key_detail(base: str) -> str:
    """The service's own 401 ``detail`` for a wrong key (asked here without the page)."""
    req = urllib.request.Request(f"{base}/api/collections", headers={"X-API-Key": "wrong"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 401
    return json.loads(err.value.read())["detail"]


def test_wrong_api_key_shows_the_form_again(keyed_page, browser_context):
    """A wrong key gives the form again, focused, with the 401 body's ``detail`` ("wrong API key ...") as
    text; the wrong key is not kept; the right one then works."""
    page = keyed_page
    page.goto(f"{page.base}/")
    wrong = "not-the-key-123"
    _enter_key(page, wrong)
    message = page.locator("#key-message")
    sync_api.expect(message).to_be_visible(timeout=TIMEOUT_MS)
    assert message.inner_text() == _wrong_key_detail(page.base)
    assert "wrong API key" in message.inner_text()
    assert page.locator("#key-form").is_visible() and page.evaluate("document.activeElement.id") == "api-key"
    assert wrong not in page.evaluate("JSON.stringify(Object.assign({}, sessionStorage))")
    assert [(k, s) for _, k, s in _api_requests(page)] == [(None, 401), (wrong, 401)]
    _enter_key(page, KEY)
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#key-form").is_hidden()
    assert page.locator("#collection option").count() >= 3
    _assert_key_kept_private(page, browser_context)


def test_cancelling_the_key_form_fails_the_waiting_call_with_a_message(keyed_page, browser_context):
    """Cancel (and Escape) closes the key form: the call that waited for it fails with a readable error instead
    of waiting forever, nothing more is sent, and the next call asks again."""
    page = keyed_page
    page.goto(f"{page.base}/")
    page.locator("#key-form").wait_for(state="visible")
    page.locator("#key-cancel").click()
    alert = page.locator("#messages [role=alert]")
    sync_api.expect(alert).to_be_visible(timeout=TIMEOUT_MS)
    assert "Could not list the collections: no API key was given" in alert.inner_text()
    assert page.locator("#key-form").is_hidden()
    assert [(k, s) for _, k, s in _api_requests(page)] == [(None, 401)]
    page.reload()  # a new call asks again; Escape cancels too
    page.locator("#key-form").wait_for(state="visible")
    page.keyboard.press("Escape")
    sync_api.expect(page.locator("#key-form")).to_be_hidden(timeout=TIMEOUT_MS)
    sync_api.expect(alert).to_contain_text("no API key was given", timeout=TIMEOUT_MS)


def test_forget_key_clears_it_and_the_next_call_asks(keyed_page, collections, browser_context, tmp_path, data_dir):
    """"Forget key" empties sessionStorage, hides the results and revokes their images; the next call (an
    upload) goes out without a key, gets 401 and shows the form (no "wrong" message); with the key the same
    upload is sent again and gives the brute-force top-5."""
    page = keyed_page
    hog = collections[1][HOG]
    page.goto(f"{page.base}/?collection={HOG}&split=test&index=3&k=5")
    _enter_key(page, KEY)
    _n_hits(page, 5)
    _assert_hits(page, _expected(hog, hog[2][3], 5))
    _assert_images_loaded(page)
    shown = _blob_images(page)
    page.locator("#forget-key").focus()
    page.keyboard.press("Enter")
    assert page.evaluate("sessionStorage.length") == 0
    assert page.locator("#forget-key").is_hidden() and page.locator("[data-hit-rank]").count() == 0
    assert "forgotten" in page.locator("#status").inner_text()
    assert _loads(page, shown) == [False] * len(shown)
    before = len(page.requests)
    page.set_input_files("#query-file", str(_png(tmp_path, data_dir, 12)))
    page.locator("#key-form").wait_for(state="visible")
    assert page.evaluate("document.activeElement.id") == "api-key"
    assert page.locator("#key-message").is_hidden()
    upload = [r for r in page.requests[before:] if r.url.endswith("/search/image")]
    assert upload and "x-api-key" not in upload[0].all_headers() and _status(upload[0].response()) == 401
    _enter_key(page, KEY)
    _n_hits(page, 5)
    _assert_hits(page, _expected(hog, hog[2][12], 5))
    _assert_images_loaded(page)
    upload = [r for r in page.requests[before:] if r.url.endswith("/search/image")]
    assert [(r.all_headers().get("x-api-key"), _status(r.response())) for r in upload] == [(None, 401), (KEY, 200)]
    _assert_key_kept_private(page, browser_context)
