"""A running ``cbmir serve`` and other cbmir processes on one embedded store (issue 14, store sharing).

Qdrant Edge allows one process per collection. The service holds a collection only while requests come
(``--idle-release-s``); a command that finds it held waits up to ``CBMIR_LOCK_WAIT_S`` and then says who
holds it; the service answers 503 naming the holder while a command holds it; and it serves a collection
that an ingest in another process completed. Two real processes, bounded times.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
NAME = "breastmnist_28_hog"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _cli(env: dict, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "cbmir.cli", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_service_and_commands_share_the_embedded_store(tmp_path, data_dir):
    from cbmir.app import App, CollectionRef, load_settings
    from cbmir.app.ingesting import ingest_collection

    root = tmp_path / "store"
    with App(load_settings(store_path=root, data_dir=data_dir)) as app:
        ingest_collection(app, CollectionRef("breastmnist", 28, "hog"), progress=False)
    env = {**os.environ, "CBMIR_DATA_DIR": str(data_dir), "CBMIR_STORE_PATH": str(root), "CBMIR_LOCK_WAIT_S": "0"}
    env.pop("CBMIR_API_KEY", None)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([PY, "-m", "cbmir.cli", "serve", "--port", str(port), "--idle-release-s", "1"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if _call(f"{base}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.3)
        search = f"{base}/api/collections/{NAME}/search"
        query = {"point": {"split": "test", "index": 0}}
        assert _call(search, query)[0] == 200

        # 1. while requests keep coming, the service holds the collection: a command with no wait is told so
        def load():
            while not stop.is_set():
                _call(search, query)
                time.sleep(0.2)
        t = threading.Thread(target=load, daemon=True)
        t.start()
        r = _cli(env, "search", "-c", NAME, "--query-index", 1)
        assert r.returncode == 2 and "in use by another process" in r.stderr, r.stderr
        assert f"pid={server.pid}" in r.stderr and "cmd='cbmir serve'" in r.stderr, r.stderr

        # 2. a command that may wait gets in once the requests stop and the service releases (1 s idle)
        threading.Timer(2.0, stop.set).start()
        t0 = time.monotonic()
        r = _cli({**env, "CBMIR_LOCK_WAIT_S": "60"}, "search", "-c", NAME, "--query-index", 1, "--json")
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)["hits"][0]) == 5
        assert time.monotonic() - t0 < 60
        t.join(timeout=10)

        # 3. while a command holds the collection, the service answers 503 naming it, then serves again
        hold = ("import sys, time\nfrom cbmir.search.edge_store import EdgeStore\ns = EdgeStore(sys.argv[1])\n"
                "s.count(sys.argv[2])\nprint('held', flush=True)\ntime.sleep(float(sys.argv[3]))\ns.close()\n")
        holder = subprocess.Popen([PY, "-c", hold, str(root), NAME, "4"], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            status, body = _call(search, query)
            assert status == 503 and f"pid={holder.pid}" in body["detail"], body
        finally:
            holder.wait(timeout=60)
        status, body = _call(search, query)
        assert status == 200 and len(body["hits"]) == 5

        # 4. a collection ingested by another process while the service runs is served at once
        r = _cli(env, "ingest", "-d", "breastmnist", "-s", 28, "-m", "hog", "--distance", "euclidean")
        assert r.returncode == 0, r.stderr
        names = [c["name"] for c in _call(f"{base}/api/collections")[1]]
        assert "breastmnist_28_hog_euclidean" in names
        status, body = _call(f"{base}/api/collections/breastmnist_28_hog_euclidean/search", query)
        assert status == 200 and body["distance"] == "euclidean"
    finally:
        stop.set()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
