"""Load on ``cbmir serve``: the same searches through HTTP and in-process, side by side (issue 14).

Starts the service on 127.0.0.1 (a free port) over a store in ``--work-dir``, drives a bounded load
(``--clients`` concurrent clients, ``--duration`` seconds each; every client a loop of requests over one
keep-alive connection, stopped by the clock) of search-by-point and search-by-image, on

* PneumoniaMNIST 28 ``hog`` (real files, ``CBMIR_DATA_DIR``; ingested into the work store if missing);
* a synthetic collection of 90,000 x 1,024 random float32 vectors (``--synthetic-n``), whose extractor is a
  random-init DenseNet121 (1,024 dims; speed does not depend on weight values), queried by its 200 test
  points and by uploaded PneumoniaMNIST test images;

then stops the service and runs the same requests in-process through :class:`cbmir.client.SearchClient`
(same threads, same queries; image queries as files, decoded the same way). Prints QPS, p50/p95/p99
latency (ms), errors, and the service / in-process ratios at p50 and p95, with the issue's target for
search-by-point on PneumoniaMNIST: service p95 <= 2 x in-process p95 + 5 ms. Clients, service and
in-process searches share this machine's CPUs: say so with the figures.

    python -m cbmir.benchmarks.service_load --work-dir /tmp/cbmir-load            # full run, ~6 min + setup
    python -m cbmir.benchmarks.service_load --duration 2 --clients 2 --synthetic-n 2000   # smoke run
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

PNEUMONIA = "pneumoniamnist_28_hog"
SYNTH = "synthetic90k_28_densenet121_randinit"
N_SYNTH_QUERIES = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_store(root: Path, data_dir: Path, synthetic_n: int) -> None:
    """Ingest PneumoniaMNIST 28 ``hog`` and write the synthetic collection, unless already complete."""
    from cbmir.app import App, CollectionRef, load_settings
    from cbmir.app.ingesting import ingest_collection
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor
    from cbmir.search.schema import CollectionMeta

    with App(load_settings(store_path=root, data_dir=data_dir)) as app:
        ingest_collection(app, CollectionRef("pneumoniamnist", 28, "hog"), progress=False)
        store = app.store
        emb = make_embedder(create_extractor("densenet121", random_init=True, backend="torch", device="cpu"),
                            size=28, is_3d=False)
        ident = emb.identity()
        meta = CollectionMeta(dataset="synthetic90k", size=28, model=ident["model"],
                              backend=ident.get("backend", "torch"), dim=int(emb.dim),
                              weights=str(ident.get("weights", "random-init")), random_init=True,
                              preprocessing=str(ident.get("preprocessing", "")),
                              extra={"class_names": ["a", "b"], "n_classes": 2})
        store.ensure_collection(SYNTH, meta)
        rng = np.random.default_rng(0)
        for split, n in (("train", synthetic_n), ("test", N_SYNTH_QUERIES)):
            have = store.count(SYNTH, split)
            step = 4096
            for lo in range(have - have % step, n, step):
                hi = min(n, lo + step)
                vecs = np.random.default_rng(lo + (0 if split == "train" else 1 << 30)).standard_normal(
                    (hi - lo, meta.dim), dtype=np.float32)
                labels = rng.integers(0, 2, hi - lo)
                pays = [{"dataset": "synthetic90k", "split": split, "index": int(i), "label": int(lab),
                         "model": meta.model, "size": 28, "image_id": f"synthetic90k/{split}/{i}"}
                        for i, lab in zip(range(lo, hi), labels)]
                store.upsert(SYNTH, split, list(range(lo, hi)), vecs, pays)
        store.flush(SYNTH)


def query_images(data_dir: Path, n: int = 64) -> list[bytes]:
    """PNG bytes of the first ``n`` PneumoniaMNIST 28 test images (the image queries)."""
    from PIL import Image

    with np.load(data_dir / "pneumoniamnist.npz") as z:
        imgs = z["test_images"][:n]
    out = []
    for im in imgs:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _multipart(png: bytes, k: int) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def drive(one_request, clients: int, duration: float) -> dict:
    """Run ``one_request(worker_state, rng) -> ok`` in ``clients`` threads for ``duration`` seconds.

    Returns:
        ``{"n", "errors", "qps", "p50_ms", "p95_ms", "p99_ms"}`` over the requests that finished in time.
    """
    lat: list[list[float]] = [[] for _ in range(clients)]
    errs = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        rng = random.Random(i)
        state: dict = {}
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                ok = one_request(state, rng)
            except Exception:  # noqa: BLE001 - every failure is an error of the run
                ok = False
                state.clear()
            lat[i].append(time.perf_counter() - t0)
            errs[i] += 0 if ok else 1
        conn = state.get("conn")
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = np.asarray([x for row in lat for x in row]) * 1000
    if not len(all_lat):
        return {"n": 0, "errors": sum(errs), "qps": 0.0, "p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(all_lat, [50, 95, 99])
    return {"n": int(len(all_lat)), "errors": int(sum(errs)), "qps": len(all_lat) / wall,
            "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def http_request(port: int, collection: str, kind: str, n_queries: int, pngs: list[bytes]):
    """A ``one_request`` for :func:`drive` through the service (one keep-alive connection per client)."""
    def one(state, rng) -> bool:
        conn = state.get("conn")
        if conn is None:
            conn = state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        if kind == "point":
            body = json.dumps({"point": {"split": "test", "index": rng.randrange(n_queries)}, "k": 5}).encode()
            conn.request("POST", f"/api/collections/{collection}/search", body,
                         {"content-type": "application/json"})
        else:
            body, ctype = _multipart(pngs[rng.randrange(len(pngs))], 5)
            conn.request("POST", f"/api/collections/{collection}/search/image", body, {"content-type": ctype})
        r = conn.getresponse()
        data = r.read()
        return r.status == 200 and len(json.loads(data)["hits"]) == 5
    return one


def client_request(client, collection: str, kind: str, n_queries: int, files: list[Path]):
    """The same requests in-process through :class:`cbmir.client.SearchClient`."""
    def one(state, rng) -> bool:
        if kind == "point":
            hits = client.search_by_point(collection, rng.randrange(n_queries), split="test", k=5)
        else:
            hits = client.search_by_image(collection, str(files[rng.randrange(len(files))]), k=5)
        return len(hits[0]) == 5
    return one


def start_service(root: Path, data_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "CBMIR_DATA_DIR": str(data_dir)}
    env.pop("CBMIR_API_KEY", None)
    p = subprocess.Popen([sys.executable, "-m", "cbmir.cli", "serve", "--store-path", str(root), "--port",
                          str(port), "--idle-release-s", "0"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"the service exited with code {p.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return p
        except OSError:
            time.sleep(0.5)
    p.kill()
    raise SystemExit("the service did not answer /health within 120 s")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "cbmir-service-load")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CBMIR_DATA_DIR", "~/.medmnist")))
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per (collection, kind, clients)")
    ap.add_argument("--clients", default="8,32", help="comma-separated concurrent clients")
    ap.add_argument("--synthetic-n", type=int, default=90_000, help="database points of the synthetic collection")
    ap.add_argument("--output", "-o", type=Path, help="write the figures as JSON")
    a = ap.parse_args(argv)
    data_dir = a.data_dir.expanduser()
    root = a.work_dir / "store"
    clients = [int(x) for x in a.clients.split(",")]
    t0 = time.perf_counter()
    build_store(root, data_dir, a.synthetic_n)
    print(f"store ready in {time.perf_counter() - t0:.0f} s: {root}", flush=True)
    pngs = query_images(data_dir)
    files = []
    for i, png in enumerate(pngs):
        f = a.work_dir / "queries" / f"q{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(png)
        files.append(f)
    cases = [(PNEUMONIA, "point", 624), (PNEUMONIA, "image", 624), (SYNTH, "point", N_SYNTH_QUERIES),
             (SYNTH, "image", N_SYNTH_QUERIES)]
    rows = []
    port = _free_port()
    server = start_service(root, data_dir, port)
    try:
        for coll, kind, nq in cases:
            one = http_request(port, coll, kind, nq, pngs)
            drive(one, 2, min(2.0, a.duration))  # warm-up: shard loaded, extractor built
            for c in clients:
                rows.append({"collection": coll, "kind": kind, "mode": "service", "clients": c,
                             **drive(one, c, a.duration)})
                print(_line(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    from cbmir.app import load_settings
    from cbmir.client import SearchClient

    with SearchClient(settings=load_settings(store_path=root, data_dir=data_dir)) as client:
        for coll, kind, nq in cases:
            one = client_request(client, coll, kind, nq, files)
            drive(one, 2, min(2.0, a.duration))
            for c in clients:
                rows.append({"collection": coll, "kind": kind, "mode": "in-process", "clients": c,
                             **drive(one, c, a.duration)})
                print(_line(rows[-1]), flush=True)
    ratios = _ratios(rows)
    print("\nservice / in-process latency ratios")
    for r in ratios:
        print(f"  {r['collection']:<38} {r['kind']:<6} {r['clients']:>3} clients: p50 {r['p50_ratio']:.2f}x, "
              f"p95 {r['p95_ratio']:.2f}x" + (f"  target p95 <= 2x + 5 ms: {'met' if r['target_met'] else 'NOT met'}"
                                              if r["target_met"] is not None else ""))
    out = {"machine": f"{os.cpu_count()} CPUs (shared), {sys.platform}", "date": time.strftime("%Y-%m-%d %H:%M"),
           "duration_s": a.duration, "rows": rows, "ratios": ratios}
    if a.output:
        a.output.write_text(json.dumps(out, indent=1))
    return out


def _line(r: dict) -> str:
    if not r["n"]:
        return f"{r['collection']:<38} {r['kind']:<6} {r['mode']:<10} {r['clients']:>3} clients: no request finished"
    return (f"{r['collection']:<38} {r['kind']:<6} {r['mode']:<10} {r['clients']:>3} clients: {r['n']:>6} req, "
            f"{r['qps']:8.1f} QPS, p50 {r['p50_ms']:8.2f} ms, p95 {r['p95_ms']:8.2f} ms, "
            f"p99 {r['p99_ms']:8.2f} ms, errors {r['errors']}")


def _ratios(rows: list[dict]) -> list[dict]:
    by = {(r["collection"], r["kind"], r["clients"], r["mode"]): r for r in rows}
    out = []
    for (coll, kind, c, mode), s in by.items():
        p = by.get((coll, kind, c, "in-process"))
        if mode != "service" or p is None or not s["n"] or not p["n"]:
            continue
        target = (s["p95_ms"] <= 2 * p["p95_ms"] + 5) if (coll, kind) == (PNEUMONIA, "point") else None
        out.append({"collection": coll, "kind": kind, "clients": c, "p50_ratio": s["p50_ms"] / p["p50_ms"],
                    "p95_ratio": s["p95_ms"] / p["p95_ms"], "target_met": target})
    return out


if __name__ == "__main__":
    main()
