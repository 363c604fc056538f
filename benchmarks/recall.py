"""Recall@k and queries per second of each search mode on the embedded engine (Qdrant Edge).

    python -m cbmir.benchmarks.recall                         # 200,000 x 1,024 synthetic + PneumoniaMNIST 28 HOG
    python -m cbmir.benchmarks.recall --n 20000 --queries 200 # a quick run
    python -m cbmir.benchmarks.recall --real none --modes exact,hnsw+int8 --efs 64,128

For every mode (:mod:`cbmir.search.index_config`: ``exact``, ``exact+int8``, ``exact+binary``, ``hnsw``,
``hnsw+int8``, ``hnsw+binary``; HNSW modes at each ``--efs`` value) a collection of the database vectors
is built through cbmir's own store (:meth:`~cbmir.search.store.VectorStore.upsert`, then
:meth:`~cbmir.search.store.VectorStore.build_index`), and every query is answered through
:meth:`~cbmir.search.store.VectorStore.search` (the ``cbmir search`` path: split filter, k + tie margin
candidates), in batches of ``--batch`` queries. One line per mode:

* ``recall@k``: mean over queries of |mode's top-k ∩ exact top-k| / k, the exact top-k being the
  ``exact`` mode's answer (float32 Qdrant Edge; checked against a float64 numpy brute force on a sample);
* ``QPS``: queries / wall seconds of the batched search (best of ``--repeat`` passes), and its ratio to
  the exact mode's QPS timed alternately with it (``--exact-sample`` queries of the exact collection right
  after each pass of the mode), so that the load of a shared machine weighs on both sides alike;
* ``build s``: upsert + index build seconds.

**Synthetic collection** (:func:`synthetic_embeddings`), shaped like CNN image embeddings: clustered and of
low intrinsic dimension, non-negative like post-ReLU average-pooled features — ``z = c_j + 0.6 e`` with
``c_j ~ N(0, 2² I_32)`` one of 100 cluster centres and ``e ~ N(0, I_32)``, then
``x = relu(z W + b) + 0.01 u`` with ``W ~ N(0, 1/32)`` (32 x dim), ``b ~ N(-0.5, 0.25²)``,
``u ~ U(0, 1)`` (seeded; queries are further draws of the same distribution). i.i.d. Gaussian vectors
would be the unrealistic worst case for graph indexes. Binary quantization keeps one bit per value (its
sign), so on non-negative features nearly every bit is 1: its lines show what that costs.

**Real collection**: PneumoniaMNIST 28 px, HOG (1,296 dims), train split = database, test split = queries.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbmir.search.index_config import IndexConfig

K_DEFAULT = 10
MODES = ("exact", "exact+int8", "exact+binary", "hnsw", "hnsw+int8", "hnsw+binary")
TARGET_RECALL, TARGET_SPEEDUP = 0.99, 10.0


def synthetic_embeddings(n: int, dim: int, seed: int, *, clusters: int = 100, latent: int = 32,
                         block: int = 20_000) -> np.ndarray:
    """``n`` float32 ``(n, dim)`` synthetic image-like embeddings (module docstring). The cluster centres and the
    map ``W, b`` depend on ``dim`` only, so database and queries (other ``seed``) share them."""
    shared = np.random.default_rng(10_000 + dim)
    centres = 2.0 * shared.standard_normal((clusters, latent))
    w = shared.standard_normal((latent, dim)) / np.sqrt(latent)
    b = -0.5 + 0.25 * shared.standard_normal(dim)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, block):
        m = min(block, n - lo)
        z = centres[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, latent))
        out[lo:lo + m] = np.maximum(z @ w + b, 0.0) + 0.01 * rng.random((m, dim))
    return out


def parse_mode(text: str) -> IndexConfig:
    """``exact``, ``hnsw``, ``exact+int8``, ``hnsw+binary`` ... -> :class:`IndexConfig`."""
    index, _, quant = text.partition("+")
    return IndexConfig(index=index, quantization=quant or "none")


@dataclass
class ModeResult:
    """One line of the benchmark: recall@k against exact search, QPS, the exact QPS timed alternately with it
    and their ratio, and the seconds to build the collection (upsert + index)."""

    collection: str
    mode: str
    describe: str
    recall: float
    qps: float
    exact_qps: float
    speedup: float
    build_s: float

    def line(self, k: int) -> str:
        return (f"{self.collection:<23} {self.mode:<20} recall@{k} {self.recall:6.4f}  QPS {self.qps:8.1f}  "
                f"(exact {self.exact_qps:6.1f}: {self.speedup:5.1f}x)  build {self.build_s:6.0f} s")


def _fill(store, name: str, db: np.ndarray, mode: IndexConfig, step: int = 10_000) -> float:
    """Build collection ``name`` of ``db`` (train split) in ``mode``; seconds (upsert + index build)."""
    from cbmir.search.schema import CollectionMeta

    t0 = time.perf_counter()
    store.ensure_collection(name, CollectionMeta(dataset="bench", size=0, model="bench", backend="numpy",
                                                 dim=int(db.shape[1]), index=mode.to_meta()))
    for lo in range(0, len(db), step):
        hi = min(lo + step, len(db))
        store.upsert(name, "train", list(range(lo, hi)), db[lo:hi], [{"split": "train"}] * (hi - lo))
    store.flush(name)
    store.build_index(name)
    return time.perf_counter() - t0


def _timed(store, name: str, q: np.ndarray, k: int, batch: int, ef: int | None = None):
    """``(top-k row indices (Q, k), seconds)`` of one batched pass."""
    t0 = time.perf_counter()
    parts = [store.search(name, q[lo:lo + batch], k, ef=ef).indices for lo in range(0, len(q), batch)]
    return np.concatenate(parts), time.perf_counter() - t0


def _search(store, name: str, q: np.ndarray, k: int, batch: int, repeat: int, ef: int | None = None,
            exact: tuple[str, np.ndarray] | None = None):
    """``(top-k (Q, k), best QPS, best exact QPS)``: ``repeat`` passes, each followed by a pass of the exact
    collection ``exact = (name, sample queries)`` when given (its best QPS, else NaN)."""
    best, best_exact, idx = float("inf"), float("inf"), None
    for _ in range(max(1, repeat)):
        idx, dt = _timed(store, name, q, k, batch, ef)
        best = min(best, dt)
        if exact is not None:
            best_exact = min(best_exact, _timed(store, exact[0], exact[1], k, batch)[1])
    return idx, len(q) / best, (len(exact[1]) / best_exact if exact is not None else float("nan"))


def _recall(got: np.ndarray, ref: np.ndarray) -> float:
    k = ref.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(got, ref)]))


def numpy_topk(q: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    """float64 cosine brute-force top-k rows (ties by lower row)."""
    qn = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    out = []
    dn_norm = np.linalg.norm(db.astype(np.float64), axis=1)
    sims = np.concatenate([(qn @ db[lo:lo + 20_000].astype(np.float64).T) / dn_norm[lo:lo + 20_000]
                           for lo in range(0, len(db), 20_000)], axis=1)
    for row in sims:
        out.append(np.lexsort((np.arange(len(row)), -row))[:k])
    return np.asarray(out)


def run_collection(label: str, db: np.ndarray, q: np.ndarray, *, work: Path, modes, efs, k: int, batch: int,
                   repeat: int, exact_sample: int = 200, check: int = 100, echo=print) -> list[ModeResult]:
    """Every mode on one collection; lines are printed as they come. The exact collection is built first (its
    answers are the reference) and kept, to be timed alternately with every other mode."""
    from cbmir.search.edge_store import EdgeStore

    results: list[ModeResult] = []
    exact_name = f"{label}_exact"
    sample = q[:min(exact_sample, len(q))]
    with EdgeStore(work / label) as store:
        build = _fill(store, exact_name, db, IndexConfig())
        ref, qps, _ = _search(store, exact_name, q, k, batch, repeat)
        n = min(check, len(q))
        echo(f"# {label}: {len(db):,} x {db.shape[1]:,} database, {len(q):,} queries; exact (Edge, float32) vs "
             f"float64 numpy brute force on {n} queries: recall@{k} {_recall(ref[:n], numpy_topk(q[:n], db, k)):.4f}")
        if "exact" in modes:
            results.append(ModeResult(label, "exact", "exact", 1.0, qps, qps, 1.0, build))
            echo(results[-1].line(k))
        for mode_name in [m for m in modes if m != "exact"]:
            mode = parse_mode(mode_name)
            name = f"{label}_{mode_name.replace('+', '_')}"
            build = _fill(store, name, db, mode)
            for ef in (efs if mode.index == "hnsw" else [None]):
                got, qps, exact_qps = _search(store, name, q, k, batch, repeat, ef=ef, exact=(exact_name, sample))
                used = mode.with_ef(ef)
                results.append(ModeResult(label, used.name + (f" ef={ef}" if ef else ""), used.describe(),
                                          _recall(got, ref), qps, exact_qps, qps / exact_qps, build))
                echo(results[-1].line(k))
            store.delete_collection(name)
        store.delete_collection(exact_name)
    shutil.rmtree(work / label, ignore_errors=True)
    return results


def pneumonia_hog(data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """PneumoniaMNIST 28 px HOG vectors: ``(train (4708, 1296), test (624, 1296))`` float32."""
    from cbmir.core.settings import get_settings
    from cbmir.ingest.embedder import make_embedder
    from cbmir.ingest.extractors import create_extractor
    from cbmir.ingest.medmnist_data import open_medmnist

    src = open_medmnist("pneumoniamnist", 28, data_dir=data_dir or get_settings().data_dir)
    emb = make_embedder(create_extractor("hog"), size=28, is_3d=False)
    out = []
    for split in ("train", "test"):
        out.append(np.concatenate([np.asarray(emb.embed(b.images), dtype=np.float32)
                                   for b in src.iter_batches(split, 512)]))
    return out[0], out[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="synthetic database points [200000]")
    ap.add_argument("--dim", type=int, default=1024, help="synthetic dimension [1024]")
    ap.add_argument("--queries", type=int, default=1000, help="synthetic queries [1000]")
    ap.add_argument("--k", type=int, default=K_DEFAULT)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated [{','.join(MODES)}]")
    ap.add_argument("--efs", default="64,128,256", help="HNSW query-time ef values [64,128,256]")
    ap.add_argument("--batch", type=int, default=100, help="queries per search call [100]")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per mode, best kept [2]")
    ap.add_argument("--exact-sample", type=int, default=200, help="queries of the exact pass timed after each "
                    "pass of a mode [200]")
    ap.add_argument("--real", default="pneumoniamnist", help="pneumoniamnist | none")
    ap.add_argument("--synthetic", default="yes", help="yes | no")
    ap.add_argument("--data-dir", default=None, help="MedMNIST files [CBMIR_DATA_DIR]")
    ap.add_argument("--work-dir", default=None, help="folder for the temporary stores [system temp]")
    ap.add_argument("--json", default=None, help="write every line as JSON here")
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in modes:
        parse_mode(m)  # unknown mode: CbmirError
    efs = [int(x) for x in a.efs.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="cbmir-recall-", dir=a.work_dir))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the temporary stores
    print(f"# cbmir recall benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.processor() or platform.machine()}, {_cpus()} CPUs, load average {_load()}; "
          f"k={a.k}, batch {a.batch}, best of {a.repeat} passes")
    results: list[ModeResult] = []
    t0 = time.perf_counter()
    try:
        if a.synthetic == "yes":
            db = synthetic_embeddings(a.n, a.dim, seed=1)
            q = synthetic_embeddings(a.queries, a.dim, seed=2)
            results += run_collection(f"synthetic_{a.n}x{a.dim}", db, q, work=work, modes=modes, efs=efs, k=a.k,
                                      batch=a.batch, repeat=a.repeat, exact_sample=a.exact_sample)
            del db
        if a.real == "pneumoniamnist":
            db, q = pneumonia_hog(a.data_dir)
            results += run_collection("pneumoniamnist_28_hog", db, q, work=work, modes=modes, efs=efs, k=a.k,
                                      batch=a.batch, repeat=a.repeat, exact_sample=a.exact_sample)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    syn = [r for r in results if r.collection.startswith("synthetic")]
    hits = [r for r in syn if r.recall >= TARGET_RECALL and r.speedup >= TARGET_SPEEDUP]
    if syn:
        best = max(hits, key=lambda r: r.speedup) if hits else None
        print(f"# target recall@{a.k} >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:g}x exact QPS on the synthetic "
              f"collection: " + (f"MET by {best.mode} ({best.recall:.4f}, {best.speedup:.1f}x)" if best
                                 else "NOT MET"))
    print(f"# total {time.perf_counter() - t0:.0f} s, load average {_load()}")
    if a.json:
        Path(a.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def _load() -> str:
    import os

    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


if __name__ == "__main__":
    raise SystemExit(main())
