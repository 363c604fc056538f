"""Issue 7 — reliability and security: bad input, faults and interruptions lose nothing.

One section per row of the issue's table, plus ``cbmir verify``. Real MedMNIST files
(../shared/data/medmnist) are copied and damaged in ``tmp_path``; the original files are never
touched. CLI behaviour is tested either in a real subprocess (``python -m cbmir.cli``: exit code,
no traceback) or in-process through ``cbmir.cli.main`` (same code path, no 10 s torch import).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from cbmir.core.errors import CbmirError

from cbmir.ingest.base import Batch
REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
FLAG, SIZE, N_TRAIN, N_TEST = "breastmnist", 28, 546, 156
NAME = "breastmnist_28_hog"


# ============================================================================ helpers
def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBMIR_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    return env


def _cli_cmd(*args) -> list[str]:
    return [PY, "-m", "cbmir.cli", *map(str, args)]


def run_main(*args) -> tuple[int, str, str]:
    """``cbmir ARGS`` in-process through ``cbmir.cli.main``: ``(exit code, stdout, stderr)``.

    An exception other than SystemExit propagates (a traceback the user would see fails the test).
    """
    from cbmir import cli

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["cbmir", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def _no_collections(store: Path) -> bool:
    return not list(Path(store).glob("*/meta.json"))


def _hog_embedder(size: int = SIZE):
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor

    return make_embedder(create_extractor("hog"), size=size, is_3d=False)


class SubsetSource:
    """A real MedMNIST source cut to its first rows, with chosen rows replaced by given images."""

    def __init__(self, src, n: dict[str, int], replace: dict[tuple[str, int], np.ndarray] | None = None):
        self.src, self.n, self.replace = src, n, replace or {}
        self.name, self.size, self.is_3d, self.n_classes = src.name, src.size, src.is_3d, src.n_classes

    def split_size(self, split: str) -> int:
        return self.n[split]

    def labels(self, split: str) -> np.ndarray:
        return self.src.labels(split)[: self.n[split]]

    def iter_batches(self, split: str, batch_size: int, start: int = 0):
        for b in self.src.iter_batches(split, batch_size, start=start):
            keep = b.indices < self.n[split]
            if not keep.any():
                break
            imgs = np.array(b.images[keep])
            idx = b.indices[keep]
            for j, i in enumerate(idx):
                if (split, int(i)) in self.replace:
                    imgs[j] = self.replace[(split, int(i))]
            yield Batch(images=imgs, labels=b.labels[keep], indices=idx,
                        image_ids=[f"{self.name}/{split}/{i}" for i in idx])


@pytest.fixture(scope="module")
def breast(data_dir):
    from cbmir.ingest.medmnist_data import open_medmnist

    return open_medmnist(FLAG, SIZE, data_dir)


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory, breast):
    """A clean, complete ``breastmnist_28_hog`` Qdrant Edge store (closed; copy it to change it)."""
    from cbmir.ingest.job import ingest
    from cbmir.search.edge_store import EdgeStore

    root = tmp_path_factory.mktemp("clean") / "store"
    with EdgeStore(root) as s:
        rep = ingest(breast, _hog_embedder(), s, progress=False)
        assert rep.collection == NAME
    return root


def _copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".locks"))
    return dst


class FakeQdrant:
    """A tiny HTTP server on 127.0.0.1 that answers every request with ``respond(handler, n)``
    (``n`` = 0-based request number) -> ``(status, json body, delay_s)``; records request headers."""

    def __init__(self, respond):
        self.respond, self.requests, self.lock = respond, [], threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with outer.lock:
                    n = len(outer.requests)
                    outer.requests.append((self.command, self.path, dict(self.headers)))
                status, body, delay = outer.respond(self, n)
                if delay:
                    time.sleep(delay)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any  # noqa: N815 - http.server's method names

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _exists_false(status_first=None, n_bad=0, delay_first=0.0):
    def respond(handler, n):
        if n < n_bad:
            return status_first or 200, {"status": {"error": "service unavailable"}}, delay_first
        return 200, {"result": {"exists": False}, "status": "ok", "time": 0.0}, 0.0
    return respond


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ============================================================================ 1. damaged data files
def _rewrite_npz(src: Path, dst: Path, mutate) -> Path:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    mutate(arrays)
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst, **arrays)
    return dst


def test_damaged_data_files_cli_one_error_no_traceback_nothing_written(tmp_path, data_dir):
    """Missing, truncated and wrong-MD5 (one byte flipped) copies of a real file, through `cbmir run`
    subprocesses (run in parallel): exit 2, exactly one `error:` line naming the file and the
    problem, no traceback, no collection created. (Relabelled or reshaped files fail the same MD5
    check; their structural checks are tested below with the check bypassed.)"""
    real = data_dir / "breastmnist.npz"
    raw = real.read_bytes()
    cases = {}
    d = tmp_path / "missing"
    d.mkdir()
    cases["missing"] = (d, ["not found"])
    d = tmp_path / "truncated"
    d.mkdir()
    (d / "breastmnist.npz").write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = (d, ["MD5", "truncated"])
    d = tmp_path / "md5"
    d.mkdir()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    (d / "breastmnist.npz").write_bytes(bytes(flipped))
    cases["md5"] = (d, ["MD5", "expected"])

    procs = {}
    for key, (ddir, _) in cases.items():
        procs[key] = subprocess.Popen(
            _cli_cmd("run", "-d", FLAG, "-m", "hog", "--data-dir", ddir, "--store-path", tmp_path / f"store_{key}"),
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for key, p in procs.items():
        out, err = p.communicate(timeout=300)
        ddir, words = cases[key]
        assert p.returncode == 2, (key, out, err)
        assert "Traceback" not in err + out, (key, err)
        lines = _error_lines(err)
        assert len(lines) == 1, (key, err)
        assert str(ddir / "breastmnist.npz") in lines[0], (key, lines[0])
        for w in words:
            assert w in lines[0], (key, w, lines[0])
        assert _no_collections(tmp_path / f"store_{key}"), key


@pytest.mark.parametrize("case,mutate,words", [
    ("renamed", lambda a: a.__setitem__("train_imgs", a.pop("train_images")), ["'train_images' missing"]),
    ("shape", lambda a: a.__setitem__("train_images", a["train_images"][:, :27, :27]), ["train_images has shape"]),
    ("dtype", lambda a: a.__setitem__("val_images", a["val_images"].astype(np.float32)), ["dtype float32"]),
    ("fewer-labels", lambda a: a.__setitem__("test_labels", a["test_labels"][:-1]), ["test_labels has shape"]),
    ("label-values", lambda a: a["test_labels"].__setitem__(3, 9), ["test_labels rows [3]", "above 1"]),
])
def test_reader_structural_checks(tmp_path, data_dir, case, mutate, words):
    """Structural damage a valid archive can carry, with the MD5 check bypassed (``verify=False``,
    the documented custom-file path): one CbmirError naming the file and the problem. With the
    default ``verify=True`` the MD5 check refuses the same file first."""
    from cbmir.ingest.medmnist_data import open_medmnist

    path = _rewrite_npz(data_dir / "breastmnist.npz", tmp_path / "breastmnist.npz", mutate)
    with pytest.raises(CbmirError) as ei:
        open_medmnist(FLAG, SIZE, tmp_path, verify=False)
    msg = str(ei.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg
    with pytest.raises(CbmirError, match="MD5"):
        open_medmnist(FLAG, SIZE, tmp_path)


# ============================================================================ 2. zero vectors, NaN / inf
class NaNEmbedder:
    """Wraps an embedder: images that are constant 123 get NaN features (a broken extractor)."""

    def __init__(self, emb):
        self.emb = emb

    def __getattr__(self, k):
        return getattr(self.emb, k)

    def embed(self, images):
        v = np.array(self.emb.embed(images), dtype=np.float32)
        v[(np.asarray(images).reshape(len(images), -1) == 123).all(axis=1)] = np.nan
        return v


def test_zero_feature_vectors_stored_reported_and_same_on_both_engines(tmp_path, breast):
    """All-zero images give all-zero HOG vectors: stored as zeros, listed in the report, cosine
    similarity 0 with everything, identical rankings on Qdrant Edge and qdrant-client."""
    from cbmir.ingest.job import ingest
    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.server_store import ServerStore

    blank = np.zeros((SIZE, SIZE, 1), np.uint8)
    src = SubsetSource(breast, {"train": 60, "test": 20},
                       {("train", 5): blank, ("train", 17): blank, ("test", 2): blank})
    emb = _hog_embedder()
    stores = [EdgeStore(tmp_path / "edge"), ServerStore(location=":memory:")]
    results = []
    try:
        for s in stores:
            rep = ingest(src, emb, s, batch_size=16, progress=False)
            assert rep.zero_vectors == {"train": [5, 17], "test": [2]}
            vecs, _ = s.get_points(NAME, "train", [5, 17, 6])
            assert not vecs[:2].any() and abs(np.linalg.norm(vecs[2]) - 1) < 1e-5
            _, qv, _ = s.fetch(NAME, "test")
            res = s.search(NAME, qv, 60)  # k = whole database
            zero_q = res.scores[2]
            assert np.all(zero_q == 0) and res.indices[2, :5].tolist() == [0, 1, 2, 3, 4]
            for i in (0, 1, 3):  # zero database points score exactly 0 and rank after positive scores
                pos = {int(x): float(sc) for x, sc in zip(res.indices[i], res.scores[i])}
                assert pos[5] == 0.0 and pos[17] == 0.0
            results.append(res)
    finally:
        for s in stores:
            s.close()
    np.testing.assert_array_equal(results[0].indices, results[1].indices)
    np.testing.assert_allclose(results[0].scores, results[1].scores, atol=1e-5)


def test_zero_vectors_reported_by_the_cli(tmp_path, breast, monkeypatch):
    import cbmir.ingest.sources as sources

    blank = np.zeros((SIZE, SIZE, 1), np.uint8)
    src = SubsetSource(breast, {"train": 40, "test": 10}, {("train", 7): blank, ("train", 30): blank})
    monkeypatch.setattr(sources, "open_source", lambda *a, **k: src)
    code, out, err = run_main("ingest", "-d", FLAG, "-m", "hog", "--store-path", tmp_path / "s", "--batch-size", 8)
    assert code == 0, err
    assert "2 all-zero feature vector(s) in train rows [7, 30]" in err
    assert "cosine similarity with them is 0" in err


def test_nan_features_refused_listed_and_filled_by_rerun(tmp_path, breast, store):
    """NaN rows are never stored: every finite row is stored, the run fails naming count and rows;
    re-running with a working extractor embeds exactly those rows."""
    from cbmir.evaluation.verify import verify_collection
    from cbmir.ingest.job import ingest

    poison = np.full((SIZE, SIZE, 1), 123, np.uint8)
    src = SubsetSource(breast, {"train": 50, "test": 12}, {("train", 3): poison, ("train", 40): poison,
                                                          ("test", 11): poison})
    with pytest.raises(CbmirError) as ei:
        ingest(src, NaNEmbedder(_hog_embedder()), store, batch_size=16, progress=False)
    msg = str(ei.value)
    assert "3 feature vector(s) contained NaN/inf and were NOT stored" in msg
    assert "train rows [3, 40]" in msg and "test rows [11]" in msg
    assert store.count(NAME, "train") == 48 and store.count(NAME, "test") == 11
    idx, vecs, _ = store.fetch(NAME, "train")
    assert 3 not in idx and 40 not in idx and np.isfinite(vecs).all()
    assert not verify_collection(store, NAME, src).ok
    # the upsert itself refuses non-finite vectors too (any caller, any engine)
    with pytest.raises(CbmirError, match="NaN/inf"):
        store.upsert(NAME, "train", [3], np.full((1, vecs.shape[1]), np.inf, np.float32), [{"label": 0}])
    # fixed extractor (and input): the re-run embeds just the 3 missing rows
    src.replace = {}
    rep = ingest(src, _hog_embedder(), store, batch_size=16, progress=False)
    assert rep.written == {"train": 2, "test": 1}
    assert verify_collection(store, NAME, src).ok


# ============================================================================ 3. pixel conversions (in-memory)
def test_prepare_images_rules():
    from cbmir.ingest.embedder import prepare_images

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    # uint8 grey kept, replicated to RGB; (H, W), (H, W, 1) and (1, H, W, 1) are the same image
    a = prepare_images(u8, size=28, is_3d=False)
    assert a.shape == (1, 28, 28, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a[0, ..., 0], u8)
    np.testing.assert_array_equal(prepare_images(u8[..., None], size=28, is_3d=False), a)
    np.testing.assert_array_equal(prepare_images(u8[None, ..., None], size=28, is_3d=False), a)
    # 16-bit and float: min-max per image
    u16 = (u8.astype(np.uint16) * 40 + 1000)
    want = np.rint((u16 - u16.min()) * 255.0 / (u16.max() - u16.min())).astype(np.uint8)
    np.testing.assert_array_equal(prepare_images(u16, size=28, is_3d=False)[0, ..., 0], want)
    f = u8.astype(np.float32) / 255.0
    np.testing.assert_array_equal(prepare_images(f, size=28, is_3d=False)[0, ..., 0],
                                  np.rint((f - f.min()) * 255.0 / (f.max() - f.min())).astype(np.uint8))
    # RGBA: alpha composited on black (opaque = RGB unchanged, transparent = black)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((28, 28, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(prepare_images(rgba, size=28, is_3d=False)[0], rgb)
    rgba[..., 3] = 0
    assert not prepare_images(rgba, size=28, is_3d=False).any()
    # odd-sized: stretched to the collection's size
    one = prepare_images(rng.integers(0, 256, (37, 23, 3), dtype=np.uint8), size=28, is_3d=False)
    assert one.shape == (1, 28, 28, 3)
    # NaN refused
    with pytest.raises(CbmirError, match="NaN"):
        prepare_images(np.full((28, 28), np.nan, np.float32), size=28, is_3d=False)
    # 2D <-> 3D mix-ups refused
    with pytest.raises(CbmirError, match="3D volume"):
        prepare_images(np.zeros((28, 28, 28), np.uint8), size=28, is_3d=False)
    for img in (np.zeros((28, 28), np.uint8), np.zeros((28, 28, 3), np.uint8), np.zeros((2, 28, 28, 3), np.uint8)):
        with pytest.raises(CbmirError, match="2D image"):
            prepare_images(img, size=28, is_3d=True)
    # volumes: any dtype / side -> uint8 size^3
    v = prepare_images(rng.random((20, 30, 30)).astype(np.float32), size=28, is_3d=True)
    assert v.shape == (1, 28, 28, 28) and v.dtype == np.uint8


def test_embedder_refuses_what_it_cannot_take():
    emb = _hog_embedder()
    ok = np.zeros((2, 28, 28, 1), np.uint8)
    assert emb.embed(ok).shape == (2, 1296)
    for bad, word in [(ok.astype(np.float32), "uint8"), (np.zeros((2, 28, 28, 4), np.uint8), "channels"),
                      (np.zeros((2, 32, 32, 3), np.uint8), "28x28"), (np.zeros((2, 28, 28), np.uint8), "(B, H, W, C)")]:
        with pytest.raises(CbmirError, match=re.escape(word)):
            emb.embed(bad)


def test_search_by_image_converts_in_memory_images(tmp_path, clean_store, breast):
    """A real test image queried as uint8 (H, W), (H, W, 1), opaque RGBA and odd-sized gives the
    documented conversions; the unconverted uint8 query ranks exactly like its stored point."""
    from cbmir.client import SearchClient
    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.schema import CollectionMeta

    root = _copy_store(clean_store, tmp_path / "s")
    img = np.asarray(next(breast.iter_batches("test", 1, start=4)).images[0, ..., 0])  # (28, 28) uint8
    client = SearchClient(EdgeStore(root))
    try:
        ref = [h.index for h in client.search_by_point(NAME, 4, split="test", k=5)[0]]
        for q in (img, img[..., None], np.dstack([img, img, img, np.full_like(img, 255)])):
            assert [h.index for h in client.search_by_image(NAME, q, k=5)[0]] == ref
        assert len(client.search_by_image(NAME, np.zeros((40, 31), np.uint16), k=3)[0]) == 3
        # a grey batch (B, H, W), MedMNIST's own layout, is B queries; a batch of volumes is refused
        assert len(client.search_by_image(NAME, np.stack([img, img, img]), k=5)) == 3
        with pytest.raises(CbmirError, match="batch of 3D volumes"):
            client.search_by_image(NAME, np.zeros((2, 28, 28, 28), np.uint8))
        meta3 = CollectionMeta(dataset="adrenalmnist3d", size=28, model="hog", backend="numpy", dim=36288,
                               is_3d=True, aggregation="concat")
        client.store.ensure_collection("adrenalmnist3d_28_hog", meta3)
        with pytest.raises(CbmirError, match="2D image"):
            client.search_by_image("adrenalmnist3d_28_hog", img)
    finally:
        client.close()


# ============================================================================ 4. SIGKILL mid-ingest
def _wait_progress(p: subprocess.Popen, split: str, total: int, at_least: int, timeout: float) -> int:
    """Read tqdm progress from ``p``'s stderr until ``at_least`` rows of ``split`` are stored."""
    os.set_blocking(p.stderr.fileno(), False)
    buf, t0 = b"", time.time()
    pat = re.compile(rb"\[" + split.encode() + rb"\][^\r\n|]*\|[^|]*\|\s*(\d+)/" + str(total).encode())
    while time.time() - t0 < timeout:
        chunk = p.stderr.read()
        if chunk:
            buf += chunk
            found = pat.findall(buf)
            if found and int(found[-1]) >= at_least:
                return int(found[-1])
        if p.poll() is not None:
            raise AssertionError(f"ingest ended (rc {p.returncode}) before the kill: {buf[-2000:]!r}")
        time.sleep(0.01)
    raise AssertionError(f"no progress to {at_least} within {timeout} s: {buf[-2000:]!r}")


def test_sigkill_mid_ingest_then_rerun_completes_exactly(tmp_path, data_dir, clean_store):
    """REALLY kills a running `cbmir ingest` (SIGKILL) after some points are stored; Qdrant Edge
    replays its WAL on the next load (every acknowledged point kept); re-running the same command
    embeds only the missing rows; final counts equal the split sizes, no duplicates, vectors and
    payloads equal a clean run's."""
    from cbmir.search.edge_store import EdgeStore

    store, bs = tmp_path / "store", 2
    args = _cli_cmd("ingest", "-d", FLAG, "-s", SIZE, "-m", "hog", "--data-dir", data_dir,
                    "--store-path", store, "--batch-size", bs)
    p = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = _wait_progress(p, "train", N_TRAIN, at_least=60, timeout=240)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL
    with EdgeStore(store) as s:  # WAL recovery after SIGKILL; the dead holder's lock is gone
        after_kill = s.count(NAME, "train")
        # progress counts batches handed to the background writer: at most 2 batches (one upserting,
        # one queued) may not have been acknowledged when it was printed
        assert seen - 2 * bs <= after_kill < N_TRAIN, (seen, after_kill)
        assert s.count(NAME, "test") == 0
    r = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"\[train\][^:\n]*: (\d+) points", r.stdout)
    assert m and int(m.group(1)) == N_TRAIN - after_kill, r.stdout  # only the missing rows
    assert f"[train]: resumed: {after_kill} rows were already stored" in r.stdout
    with EdgeStore(store) as s, EdgeStore(clean_store) as c:
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            assert s.count(NAME, split) == n
            idx, vec, pay = s.fetch(NAME, split)
            np.testing.assert_array_equal(idx, np.arange(n))  # every row once: no duplicates, no gaps
            cidx, cvec, cpay = c.fetch(NAME, split)
            np.testing.assert_array_equal(vec, cvec)
            assert pay == cpay


def test_ctrl_c_mid_ingest_says_how_to_resume_and_rerun_resumes(tmp_path, data_dir):
    """SIGINT (Ctrl-C) to a running `cbmir run`: exit 130, one line saying to re-run, no traceback;
    the points acknowledged so far are kept and the same command resumes from them."""
    from cbmir.search.edge_store import EdgeStore

    store, bs = tmp_path / "store", 8
    args = _cli_cmd("run", "-d", FLAG, "-s", SIZE, "-m", "hog", "--data-dir", data_dir,
                    "--store-path", store, "--batch-size", bs)
    # SIGINT back to its default in the child: a shell runs background jobs (`cmd &`, as CI may run
    # the suite) with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    p = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_progress(p, "train", N_TRAIN, at_least=40, timeout=240)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = err.decode(errors="replace")
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted: re-run the same command to resume" in err
    with EdgeStore(store) as s:
        kept = s.count(NAME, "train")
    assert 0 < kept < N_TRAIN
    r = subprocess.run([*args, "-o", tmp_path / "r.json"], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[train]: resumed: {kept} rows were already stored" in r.stdout, r.stdout
    assert "ACC@1" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["resumed_from"] == {"train": kept, "test": 0}


def test_collection_interrupted_while_being_created_is_recreated(tmp_path):
    """A kill between shard creation and meta.json (or during a delete) leaves a shard without
    metadata: the collection reads as absent and the next create replaces the leftover."""
    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.schema import CollectionMeta

    meta = CollectionMeta(dataset=FLAG, size=SIZE, model="hog", backend="numpy", dim=4)
    with EdgeStore(tmp_path) as s:
        s.ensure_collection(NAME, meta)
        s.upsert(NAME, "train", [0], np.ones((1, 4), np.float32), [{"split": "train", "label": 0}])
    (tmp_path / NAME / "meta.json").unlink()
    with EdgeStore(tmp_path) as s:
        assert s.read_meta(NAME) is None and NAME not in s.list_collections()
        s.ensure_collection(NAME, meta)
        assert s.count(NAME) == 0


# ============================================================================ 5. second process, same store
def test_second_process_is_told_the_store_is_in_use(tmp_path, clean_store, data_dir):
    from cbmir.search.edge_store import EdgeStore

    root = _copy_store(clean_store, tmp_path / "s")
    holder = EdgeStore(root)
    n0 = holder.count(NAME, "train")  # opens the shard: lock held
    _, v0, _ = holder.fetch(NAME, "test")
    code = ("import sys\nfrom cbmir.core.errors import CbmirError\nfrom cbmir.search.edge_store import EdgeStore\n"
            "try:\n    EdgeStore(sys.argv[1]).count(sys.argv[2])\nexcept CbmirError as e:\n"
            "    print(e, file=sys.stderr); sys.exit(3)\n")
    r = subprocess.run([PY, "-c", code, str(root), NAME], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3, r.stderr
    assert "in use by another process" in r.stderr and f"pid={os.getpid()}" in r.stderr
    assert str(holder.lock_path(NAME)) in r.stderr
    # the CLI in another process says the same, as one error line
    r = subprocess.run([PY, "-m", "cbmir.cli", "verify", "-d", FLAG, "-m", "hog", "--data-dir", str(data_dir),
                        "--store-path", str(root)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(_error_lines(r.stderr)) == 1 and "in use by another process" in r.stderr
    # within this process, stores share the open shard and its lock (a service and a CLI command coexist)
    rc, out, err = run_main("verify", "-d", FLAG, "-m", "hog", "--data-dir", data_dir, "--store-path", root)
    assert rc == 0 and out.startswith("OK"), (out, err)
    # nothing was damaged; after the holder closes, others get in
    assert holder.count(NAME, "train") == n0
    np.testing.assert_array_equal(holder.fetch(NAME, "test")[1], v0)
    holder.close()
    r = subprocess.run([PY, "-c", code, str(root), NAME], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


# ============================================================================ 6. server unreachable / slow / restarting
def test_server_503_then_ok_is_retried():
    from cbmir.search.server_store import ServerStore

    fake = FakeQdrant(_exists_false(status_first=503, n_bad=2))
    try:
        s = ServerStore(url=fake.url, retry_total_s=20, retry_base_s=0.05)
        assert s.read_meta("anything") is None
        assert s.retries == 2 and len(fake.requests) == 3
    finally:
        fake.close()


def test_server_timeout_is_retried():
    from cbmir.search.server_store import ServerStore

    fake = FakeQdrant(_exists_false(n_bad=1, delay_first=2.5))  # first answer comes after the 1 s timeout
    try:
        s = ServerStore(url=fake.url, timeout=1, retry_total_s=20, retry_base_s=0.05)
        assert s.read_meta("anything") is None and s.retries == 1
    finally:
        fake.close()


def test_server_always_failing_gives_clear_error_in_bounded_time():
    from cbmir.search.server_store import ServerStore

    fake = FakeQdrant(lambda h, n: (503, {"status": {"error": "restarting"}}, 0.0))
    try:
        s = ServerStore(url=fake.url, retry_total_s=1.5, retry_base_s=0.1)
        t0 = time.monotonic()
        with pytest.raises(CbmirError) as ei:
            s.count("x")
        assert time.monotonic() - t0 < 5
        msg = str(ei.value)
        assert fake.url in msg and "HTTP 503" in msg and "attempt(s)" in msg and len(fake.requests) >= 3
    finally:
        fake.close()


def test_server_unreachable_cli_clear_error_bounded_time(tmp_path, monkeypatch):
    from cbmir.core.settings import get_settings
    from cbmir.search.store import open_store

    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("CBMIR_QDRANT_RETRY_S", "1.5")
    store = open_store(get_settings(qdrant_url=url))  # the retry budget comes from the environment
    t0 = time.monotonic()
    with pytest.raises(CbmirError, match="unreachable"):
        store.count(NAME)
    assert time.monotonic() - t0 < 1.5 + 1.0 and store.retries >= 1  # within the budget (+ one connect)
    code, out, err = run_main("evaluate", "-d", FLAG, "-m", "hog", "--qdrant-url", url)
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert url in line and "unreachable" in line and "ConnectError" in line


def test_partial_batches_resent_idempotently(breast):
    """The client fails some upserts after the server stored them (reply lost) and some before:
    retries re-send the same deterministic ids; no duplicates, nothing lost, same vectors."""
    from httpx import ReadTimeout
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    from cbmir.evaluation.verify import verify_collection
    from cbmir.ingest.job import ingest
    from cbmir.search.server_store import ServerStore

    src = SubsetSource(breast, {"train": 64, "test": 16})
    flaky = ServerStore(location=":memory:", retry_base_s=0.001)
    real_upsert, calls = flaky.client.upsert, {"n": 0}

    def upsert(*a, **k):
        calls["n"] += 1
        if calls["n"] % 3 == 1:  # stored, but the reply is lost
            real_upsert(*a, **k)
            raise ResponseHandlingException(ReadTimeout("reply lost"))
        if calls["n"] % 3 == 2:  # refused before storing
            raise UnexpectedResponse(503, "Service Unavailable", b"{}", httpx.Headers())
        return real_upsert(*a, **k)

    flaky.client.upsert = upsert
    clean = ServerStore(location=":memory:")
    ingest(src, _hog_embedder(), flaky, batch_size=8, progress=False)
    ingest(src, _hog_embedder(), clean, batch_size=8, progress=False)
    assert flaky.retries >= 10
    assert verify_collection(flaky, NAME, src).ok
    for split in ("train", "test"):
        a, b = flaky.fetch(NAME, split), clean.fetch(NAME, split)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[2] == b[2]
        # qdrant-client's local mode re-normalises an overwritten point (1 float32 ulp); a server and
        # Qdrant Edge store re-sent points bit-identically (see the SIGKILL test)
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-7)


# ============================================================================ 7. collection of another configuration
def test_existing_collection_of_another_configuration_refused_then_recreate(tmp_path, data_dir):
    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.schema import CollectionMeta, make_payload

    root = tmp_path / "s"
    old = CollectionMeta(dataset=FLAG, size=SIZE, model="hog", backend="numpy", dim=8,
                         preprocessing="an older hog", weights="none")
    with EdgeStore(root) as s:
        s.ensure_collection(NAME, old)
        v = np.eye(3, 8, dtype=np.float32)
        s.upsert(NAME, "train", [0, 1, 2], v, [make_payload(dataset=FLAG, split="train", index=i, label=0,
                                                            model="hog", size=SIZE, image_id=str(i)) for i in range(3)])
    code, out, err = run_main("ingest", "-d", FLAG, "-m", "hog", "--data-dir", data_dir, "--store-path", root)
    assert code == 2 and len(_error_lines(err)) == 1 and "Traceback" not in err
    assert "already holds another configuration" in err and "--recreate" in err
    assert "dim: stored=8 requested=1296" in err and "an older hog" in err
    assert re.search(r"stored: +breastmnist@28 model=hog backend=numpy dim=8", err)
    assert re.search(r"requested: breastmnist@28 model=hog backend=numpy dim=1296", err)
    with EdgeStore(root) as s:  # the stored points are untouched
        assert s.count(NAME) == 3
        np.testing.assert_allclose(s.fetch(NAME, "train")[1], v)
    code, out, err = run_main("ingest", "-d", FLAG, "-m", "hog", "--data-dir", data_dir, "--store-path", root,
                              "--recreate")
    assert code == 0, err
    with EdgeStore(root) as s:
        assert s.meta(NAME).dim == 1296 and s.count(NAME, "train") == N_TRAIN and s.count(NAME, "test") == N_TEST


def test_ensure_collection_refuses_other_distance_on_both_engines(store):
    from cbmir.search.schema import CollectionMeta

    a = CollectionMeta(dataset="d", size=28, model="m", backend="torch", dim=4)
    store.ensure_collection("c", a)
    b = CollectionMeta(dataset="d", size=28, model="m", backend="torch", dim=4, distance="euclidean")
    with pytest.raises(CbmirError, match="distance: stored='cosine' requested='euclidean'"):
        store.ensure_collection("c", b)
    assert store.ensure_collection("c", b, recreate=True).distance == "euclidean"


def test_replace_collection_on_both_engines(store):
    """``name`` ends with the staging collection's metadata and points; the staging one is gone."""
    from cbmir.search.schema import CollectionMeta, make_payload

    def fill(name, meta, vecs):
        store.ensure_collection(name, meta)
        store.upsert(name, "train", list(range(len(vecs))), vecs,
                     [make_payload(dataset="d", split="train", index=i, label=i % 2, model="m", size=28,
                                   image_id=str(i)) for i in range(len(vecs))])

    rng = np.random.default_rng(0)
    fill("c", CollectionMeta(dataset="d", size=28, model="m", backend="torch", dim=4),
         rng.standard_normal((3, 4)).astype(np.float32))
    new = CollectionMeta(dataset="d", size=28, model="m", backend="torch", dim=6, distance="euclidean")
    v = rng.standard_normal((5, 6)).astype(np.float32)
    fill("c__recreate", new, v)
    store.replace_collection("c__recreate", "c")
    assert "c__recreate" not in store.list_collections() and store.read_meta("c__recreate") is None
    assert store.meta("c").dim == 6 and store.meta("c").distance == "euclidean" and store.count("c") == 5
    idx, got, payloads = store.fetch("c", "train")
    np.testing.assert_array_equal(idx, np.arange(5))
    np.testing.assert_allclose(got, v, rtol=1e-6)
    assert [p["label"] for p in payloads] == [0, 1, 0, 1, 0]
    res = store.search("c", v[:2], 1)
    np.testing.assert_array_equal(res.indices[:, 0], [0, 1])
    with pytest.raises(CbmirError, match="does not exist"):
        store.replace_collection("nope", "c")
    assert store.count("c") == 5


# ============================================================================ 8. unknown names
@pytest.mark.parametrize("args,words", [
    (["-d", "nosuchmnist", "-m", "hog"], ["nosuchmnist"]),
    (["-d", FLAG, "-m", "resnet5"], ["unknown model 'resnet5'", "valid models:", "resnet50", "hog"]),
    (["-d", "adrenalmnist3d", "-s", "128", "-m", "hog"], ["no size 128", "valid sizes: 28, 64"]),
    (["-d", FLAG, "-s", "100", "-m", "hog"], ["no size 100", "valid sizes: 28, 64, 128, 224"]),
])
def test_unknown_dataset_model_size_listed(tmp_path, data_dir, args, words):
    code, out, err = run_main("run", *args, "--data-dir", data_dir, "--store-path", tmp_path / "s")
    assert code == 2
    (line,) = _error_lines(err)
    for w in words:
        assert w in line, line
    assert _no_collections(tmp_path / "s")


def test_unknown_dataset_lists_valid_datasets(tmp_path, data_dir):
    from cbmir.ingest.medmnist_data import open_medmnist

    with pytest.raises(CbmirError, match="valid datasets: .*breastmnist.*adrenalmnist3d"):
        open_medmnist("nosuchmnist", 28, data_dir)


# ============================================================================ 9. untrusted files
class Evil:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_npz_refused(tmp_path):
    from cbmir.ingest.medmnist_data import open_medmnist
    from cbmir.ingest.sources.pixels import PixelError, load_npy

    marker = tmp_path / "pwned"
    obj = np.empty(1, dtype=object)
    obj[0] = Evil(str(marker))
    arrays = {f"{s}_images": obj for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": obj for s in ("train", "val", "test")})
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(CbmirError, match="dtype object"):
        open_medmnist(FLAG, SIZE, tmp_path, verify=False)
    np.save(tmp_path / "evil.npy", obj, allow_pickle=True)
    with pytest.raises(PixelError):
        load_npy(tmp_path / "evil.npy", max_elements=10)
    assert not marker.exists()


def test_torch_checkpoint_with_pickled_object_refused(tmp_path):
    import torch

    from cbmir.ingest.extractors.weights import load_state_dict_file

    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(2, 2), "extra": Evil(str(marker))}, path)
    with pytest.raises(CbmirError, match="cannot read weights file"):
        load_state_dict_file(path)
    assert not marker.exists()
    torch.save({"conv.weight": torch.ones(2, 2)}, tmp_path / "ok.pth")  # a plain state dict still loads
    assert load_state_dict_file(tmp_path / "ok.pth")["conv.weight"].sum() == 4


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width x height`` pixels but holds (almost) no data: a decompression bomb's
    header, refused before any pixel is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_refused_by_search_cli(tmp_path, clean_store):
    from cbmir.ingest.sources.pixels import PixelError, load_image

    bomb = _png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # 900 M pixels claimed, 100 bytes on disk
    t0 = time.monotonic()
    with pytest.raises(PixelError, match="exceeds the limit|decompression bomb"):
        load_image(bomb)
    assert time.monotonic() - t0 < 5
    root = _copy_store(clean_store, tmp_path / "s")
    code, out, err = run_main("search", "-c", NAME, "--image", bomb, "--store-path", root)
    assert code == 2
    (line,) = _error_lines(err)
    assert "pixels" in line and "limit" in line


# ============================================================================ 10. server credentials
KEY = "s3cr3t-Key-that-must-not-leak"


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")  # qdrant-client's own advice
def test_api_key_from_env_is_secret_and_401_is_clear(tmp_path, monkeypatch, caplog):
    from cbmir.core.settings import get_settings
    from cbmir.search.store import open_store

    fake = FakeQdrant(lambda h, n: (401, {"status": {"error": "Unauthorized"}}, 0.0))
    try:
        monkeypatch.setenv("CBMIR_QDRANT_URL", fake.url)
        monkeypatch.setenv("CBMIR_QDRANT_API_KEY", KEY)
        s = get_settings()
        assert s.qdrant_url == fake.url and s.qdrant_api_key.get_secret_value() == KEY
        assert KEY not in repr(s) and KEY not in str(s) and KEY not in s.model_dump_json()
        caplog.set_level(logging.DEBUG)
        store = open_store(s)
        assert KEY not in repr(store)
        t0 = time.monotonic()
        with pytest.raises(CbmirError, match="HTTP 401"):
            store.read_meta(NAME)
        assert time.monotonic() - t0 < 5 and len(fake.requests) == 1  # 401 is not retried
        store.close()
        code, out, err = run_main("evaluate", "-d", FLAG, "-m", "hog")
        assert code == 2
        (line,) = _error_lines(err)
        assert "HTTP 401" in line and "API key is missing or wrong" in line and fake.url in line
        assert KEY not in out + err + caplog.text
        assert fake.requests and all(h.get("api-key") == KEY for _, _, h in fake.requests)  # it was sent
        # a TLS URL is taken as given (https), the key still hidden
        tls = open_store(get_settings(qdrant_url="https://qdrant.example.org:6333"))
        assert tls.url.startswith("https://") and KEY not in repr(tls)
        tls.close()
    finally:
        fake.close()


# ============================================================================ cbmir verify
def test_verify_ok_on_fresh_collection(tmp_path, clean_store, data_dir):
    root = _copy_store(clean_store, tmp_path / "s")
    code, out, err = run_main("verify", "-d", FLAG, "-m", "hog", "--data-dir", data_dir, "--store-path", root)
    assert code == 0, err
    (line,) = out.strip().splitlines()
    assert line.startswith(f"OK {NAME}: train {N_TRAIN}/{N_TRAIN}, test {N_TEST}/{N_TEST}, dim 1296")


def test_verify_fails_on_deleted_point_and_altered_label(tmp_path, clean_store, data_dir):
    import qdrant_edge as qe

    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.schema import point_id

    root = _copy_store(clean_store, tmp_path / "s")
    with EdgeStore(root) as s:
        s.delete_points(NAME, [point_id("train", 17)])
    code, out, err = run_main("verify", "-d", FLAG, "-m", "hog", "--data-dir", data_dir, "--store-path", root)
    assert code == 1
    (line,) = out.strip().splitlines()
    assert line.startswith("FAIL: ") and "train: 545 points stored, the source has 546 (missing rows [17])" in line

    root2 = _copy_store(clean_store, tmp_path / "s2")
    with EdgeStore(root2) as s:
        old = s.get_points(NAME, "test", [3], with_vectors=False)[1][0]["label"]
        s._shard(NAME).update(  # noqa: SLF001 - damage a stored payload underneath the store
            qe.UpdateOperation.set_payload([point_id("test", 3)], {"label": 1 - old}))
    code, out, err = run_main("verify", "-d", FLAG, "-m", "hog", "--data-dir", data_dir, "--store-path", root2)
    assert code == 1
    assert f"test: 1 label(s) differ from the source (row 3: stored {1 - old} vs file {old})" in out


def test_verify_on_the_server_engine(breast):
    """The same checks through qdrant-client (server code path): OK, then a deleted point and an
    altered label (payload overwrite through the client) are named."""
    from cbmir.evaluation.verify import verify_collection
    from cbmir.ingest.job import ingest
    from cbmir.search.schema import point_id
    from cbmir.search.server_store import ServerStore

    src = SubsetSource(breast, {"train": 40, "test": 10})
    s = ServerStore(location=":memory:")
    ingest(src, _hog_embedder(), s, batch_size=16, progress=False)
    rep = verify_collection(s, NAME, src)
    assert rep.ok and rep.verdict().startswith(f"OK {NAME}: train 40/40, test 10/10")
    s.delete_points(NAME, [point_id("test", 9)])
    s.client.set_payload(NAME, payload={"label": 7}, points=[point_id("train", 0)])
    rep = verify_collection(s, NAME, src)
    v = rep.verdict()
    assert not rep.ok and "test: 9 points stored, the source has 10 (missing rows [9])" in v
    assert "train: 1 label(s) differ from the source (row 0: stored 7" in v


# ============================================================================ 11. CLI input errors: one line, exit 2
def _one_error(code: int, out: str, err: str, *words) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("args,words", [
    (["run", "-d", FLAG, "-m", "hog", "--bogus"], ["No such option", "--bogus"]),
    (["run", "-m", "hog"], ["Missing option", "--dataset"]),
])
def test_usage_errors_are_clicks_usage_message_exit_2(args, words):
    """A real subprocess: typer 0.29's vendored click exceptions get click's usage message, no traceback."""
    p = subprocess.run(_cli_cmd(*args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    assert "Usage:" in p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("Error:")]
    for w in words:
        assert w in line, line


def test_invalid_option_values_are_one_error_line(tmp_path, data_dir):
    store = tmp_path / "store"
    base = ["run", "-d", FLAG, "-m", "hog", "--data-dir", data_dir]
    _one_error(*run_main(*base, "--distance", "manhattan", "--store-path", store), "--distance", "manhattan",
               "cosine", "euclidean")
    _one_error(*run_main(*base, "--batch-size", "0", "--store-path", store), "--batch-size", ">= 1")
    _one_error(*run_main(*base, "--threads", "0", "--store-path", store), "--threads", "CBMIR_THREADS", ">= 1")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _one_error(*run_main(*base, "--store-path", a_file), "--store-path", str(a_file), "not a directory")
    _one_error(*run_main(*base, "--qdrant-url", "localhost:6333"), "localhost:6333", "http://")
    _one_error(*run_main(*base, "--store-path", store, "-o", tmp_path / "nope" / "r.json"),
               "--output", str(tmp_path / "nope"), "does not exist")
    _one_error(*run_main("export", "-d", FLAG, "-m", "hog", "--store-path", store, "-o", tmp_path / "nope" / "x.npz"),
               "--output", str(tmp_path / "nope"), "does not exist")
    assert _no_collections(store)


@pytest.mark.parametrize("text,words", [
    ("{bad json", ["Expecting property name"]),
    ('{"dataset": "breastmnist", "size": 28}', ["missing key(s)", "model", "dim"]),
    ('{"dataset": "breastmnist", "size": 28, "model": "hog", "backend": "numpy", "dim": "many"}', ["dim = 'many'"]),
    ("[1, 2]", ["expected a JSON object"]),
])
def test_damaged_collection_meta_is_one_error_and_recreate_rebuilds(tmp_path, clean_store, data_dir, text, words):
    root = tmp_path / "store"
    shutil.copytree(clean_store, root)
    meta = root / NAME / "meta.json"
    meta.write_text(text)
    for cmd in (["evaluate", "-d", FLAG, "-m", "hog", "--store-path", root],
                ["run", "-d", FLAG, "-m", "hog", "--data-dir", data_dir, "--store-path", root]):
        _one_error(*run_main(*cmd), repr(NAME), str(meta), "damaged", "--recreate", "nothing was deleted", *words)
        assert meta.read_text() == text and (root / NAME / "shard").is_dir()  # nothing deleted or rewritten
    code, out, err = run_main("ingest", "-d", FLAG, "-m", "hog", "--data-dir", data_dir, "--store-path", root,
                              "--recreate")
    assert code == 0, err
    assert json.loads(meta.read_text())["dim"] == 1296
    code, out, err = run_main("evaluate", "-d", FLAG, "-m", "hog", "--store-path", root)
    assert code == 0 and f"{N_TEST} queries x {N_TRAIN} database" in out, (out, err)


def test_export_names_the_npz_file_numpy_writes(tmp_path, clean_store):
    for given, real in (("vecs", "vecs.npz"), ("vecs.npz", "vecs.npz"), ("v.data", "v.data.npz")):
        code, out, err = run_main("export", "-d", FLAG, "-m", "hog", "--store-path", clean_store,
                                  "-o", tmp_path / given)
        assert code == 0, err
        assert out.startswith(f"wrote {tmp_path / real}:"), out
        assert np.load(tmp_path / real)["train_vectors"].shape == (N_TRAIN, 1296)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.data.npz", "vecs.npz"]


def test_report_bad_n_boot_and_output_file_refused_before_work(tmp_path):
    for n in ("0", "-5"):
        _one_error(*run_main("report", "--n-boot", n, "-o", tmp_path / "rep"), f"--n-boot {n}", ">= 1")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _one_error(*run_main("report", "-o", a_file), f"--output {a_file} is a file", "give a directory")
    _one_error(*run_main("report", "-o", a_file / "sub"), str(a_file / "sub"), "is a file", "give a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("text,words", [
    ('k = "five"', ["k", "'five'", "integer"]),
    ('sizes = ["big"]', ["sizes", "'big'"]),
    ("latency_sample = 0", ["latency_sample", ">= 1"]),
    ('download = "false"', ["download", "'false'", "true or false"]),
    ('weights = "x"', ["weights", "'x'", "wrong type"]),
])
def test_grid_file_wrongly_typed_value_names_key_value_and_file(tmp_path, text, words):
    grid = tmp_path / "g.toml"
    grid.write_text(f'datasets = ["{FLAG}"]\nmodels = ["hog"]\nresults = "{tmp_path / "r" / "results.csv"}"\n'
                    f'store_path = "{tmp_path / "s"}"\n{text}\n')
    _one_error(*run_main("benchmark", "--config", grid, "--no-download"), f"grid file {grid}", *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.toml"]  # nothing ran


def test_unwritable_output_and_store_path_refused_before_work(tmp_path, data_dir):
    """/proc refuses new files even to root (which passes os.access checks)."""
    store = tmp_path / "store"
    base = ["-d", FLAG, "-m", "hog"]
    _one_error(*run_main("run", *base, "--data-dir", data_dir, "--store-path", store, "-o", "/proc/nope.json"),
               "--output /proc/nope.json", "cannot write")
    assert not store.exists()  # refused before the ingest
    _one_error(*run_main("export", *base, "--store-path", store, "-o", "/proc/nope.npz"),
               "--output /proc/nope.npz", "cannot write")
    for cmd in (["run", *base, "--data-dir", data_dir], ["evaluate", *base]):
        _one_error(*run_main(*cmd, "--store-path", "/proc/cbmir-store"), "/proc/cbmir-store", "--store-path",
                   "CBMIR_STORE_PATH")


def test_threads_option_and_env_set_torch_threads_before_extraction(tmp_path, data_dir, monkeypatch):
    """--threads N (or CBMIR_THREADS) is in force when the extractor is built."""
    import torch

    import cbmir.ingest.extractors as ex

    seen = []

    def stop(*a, **kw):
        seen.append(torch.get_num_threads())
        raise CbmirError("stop here")

    monkeypatch.setattr(ex, "create_extractor", stop)
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    try:
        base = ["run", "-d", FLAG, "-m", "resnet50", "--random-init", "--data-dir", data_dir,
                "--store-path", tmp_path / "s"]
        _one_error(*run_main(*base, "--threads", target), "stop here")
        torch.set_num_threads(before)
        monkeypatch.setenv("CBMIR_THREADS", str(target))
        _one_error(*run_main(*base), "stop here")
    finally:
        torch.set_num_threads(before)
    assert seen == [target, target]


def test_k_checked_before_ingest_and_against_database_size(tmp_path, data_dir, clean_store):
    store = tmp_path / "store"
    t0 = time.monotonic()
    _one_error(*run_main("run", "-d", FLAG, "-m", "hog", "--data-dir", data_dir, "--store-path", store, "--k", "0"),
               "--k 0", ">= 1")
    assert _no_collections(store) and time.monotonic() - t0 < 30  # refused before any ingest
    root = _copy_store(clean_store, tmp_path / "s")
    line = _one_error(*run_main("run", "-d", FLAG, "-m", "hog", "--data-dir", data_dir, "--store-path", root,
                                "--k", "10000"), "--k 10000", str(N_TRAIN))
    assert f"1 and {N_TRAIN}" in line
    _one_error(*run_main("evaluate", "-d", FLAG, "-m", "hog", "--store-path", root, "--k", str(N_TRAIN + 1)),
               f"--k {N_TRAIN + 1}")
    _one_error(*run_main("search", "-c", NAME, "--store-path", root, "--query-index", "9999"),
               "query index 9999", f"0..{N_TEST - 1}")
    _one_error(*run_main("search", "-c", NAME, "--store-path", root, "--image", tmp_path / "missing.png"),
               str(tmp_path / "missing.png"), "not found")
    _one_error(*run_main("search", "-c", NAME, "--store-path", root, "--image", tmp_path),
               f"query file {tmp_path} is a directory")
    _one_error(*run_main("search", "-c", NAME, "--store-path", root, "--query-index", "0", "--query-split", "foo"),
               "query split 'foo'", "train, val, test")
    _one_error(*run_main("search", "-c", NAME, "-d", "retinamnist", "--store-path", root, "--query-index", "0"),
               "not both")


def test_evaluating_an_unfinished_collection_is_refused(tmp_path, clean_store):
    """A collection whose ingest did not finish (rows missing) is not evaluated on part of a split:
    one error naming the counts and the re-run; nothing is written to --output."""
    from cbmir.search.edge_store import EdgeStore
    from cbmir.search.schema import point_id

    root = _copy_store(clean_store, tmp_path / "s")
    with EdgeStore(root) as s:
        assert s.meta(NAME).extra["split_sizes"] == {"train": N_TRAIN, "val": 78, "test": N_TEST}
        s.delete_points(NAME, [point_id("test", i) for i in range(100, N_TEST)])  # as if interrupted
    out = tmp_path / "r.json"
    line = _one_error(*run_main("evaluate", "-d", FLAG, "-m", "hog", "--store-path", root, "-o", out),
                      NAME, "incomplete", f"test: 100 of {N_TEST} points stored", "Re-run")
    assert "user archive" not in line and not out.exists()
    with EdgeStore(root) as s:
        s.delete_points(NAME, [point_id("test", i) for i in range(100)])      # no test point at all
    _one_error(*run_main("evaluate", "-d", FLAG, "-m", "hog", "--store-path", root),
               f"test: 0 of {N_TEST} points stored")
    code, out_, err = run_main("evaluate", "-d", FLAG, "-m", "hog", "--store-path", _copy_store(clean_store,
                                                                                                  tmp_path / "ok"))
    assert code == 0 and "ACC@1" in out_ and "incomplete" not in err


def test_random_init_collection_has_one_name_in_run_benchmark_and_readers(tmp_path, data_dir):
    """`run --random-init` and `benchmark --random-init` write the same `_randinit` collection (never the
    pretrained model's name); evaluate / export / verify find it with --random-init."""
    from cbmir.grid import Cell
    from cbmir.grid.cell import collection_for

    store = tmp_path / "s"
    base = ["-d", FLAG, "-m", "resnet50", "--store-path", store]
    code, out, err = run_main("run", *base, "--random-init", "--data-dir", data_dir, "--batch-size", 256)
    assert code == 0, err
    name = "breastmnist_28_resnet50_randinit"
    assert name in out
    cell = Cell(dataset=FLAG, size=SIZE, model="resnet50", backend="torch", distance="cosine", random_init=True)
    assert collection_for(cell, "concat") == name
    code, out, err = run_main("evaluate", *base, "--random-init")
    assert code == 0 and "RANDOM-INIT" in out + err, err
    _one_error(*run_main("evaluate", *base), "breastmnist_28_resnet50'", "does not exist", name)
    code, out, err = run_main("export", *base, "--random-init", "-o", tmp_path / "v.npz")
    assert code == 0 and np.load(tmp_path / "v.npz")["train_vectors"].shape == (N_TRAIN, 2048)
    code, out, err = run_main("verify", *base, "--random-init", "--data-dir", data_dir)
    assert code == 0 and out.startswith("OK"), out + err
    hog = ["-d", FLAG, "-m", "hog", "--store-path", store]                  # no weights: --random-init is moot
    assert run_main("run", *hog, "--random-init", "--data-dir", data_dir)[0] == 0
    code, out, err = run_main("evaluate", *hog, "--random-init")
    assert code == 0 and NAME in out, err


def test_missing_data_file_message_is_true(tmp_path, monkeypatch):
    """`cbmir run` has no --download: the message says where to put which file, not to pass it."""
    import cbmir.ingest.medmnist_data as md

    monkeypatch.setattr(md, "_reachable", lambda url, timeout=3.0: (False, "probe failed"))
    line = _one_error(*run_main("run", "-d", FLAG, "-s", "64", "-m", "hog", "--data-dir", tmp_path,
                                "--store-path", tmp_path / "store"),
                      str(tmp_path / "breastmnist_64.npz"), "CBMIR_DATA_DIR", "--data-dir", "breastmnist_64.npz",
                      "unreachable")
    assert "--download" not in line
    assert _no_collections(tmp_path / "store")
