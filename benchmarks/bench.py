"""``cbmir bench``: speed and memory at the study's largest scale, each figure beside its yardstick.

Every section measures cbmir and a reference in the same run, paired batch by batch (search) or query
chunk by query chunk (blas), alternating which side goes first, so that load from other processes on
the machine hits both alike; it prints wall-clock and CPU seconds:

1. **search** - evaluation of a PathMNIST-sized case (7,180 queries x 89,996 database x 1,024 dims,
   float32 synthetic vectors in an embedded Qdrant Edge collection) through
   :func:`cbmir.evaluation.evaluate.evaluate_collection` end to end (reading points back, exact batched
   search, metrics), against the engine's raw batched exact queries on the same shard (``qdrant_edge``
   ``query_batch``, ``exact=True``, the same split filter and batch size, vectors passed as arrays),
   run batch by batch beside the store's own (:class:`RawAlongside`).
2. **blas** - the ``--search-backend blas`` path (:func:`cbmir.search.blas.exact_topk` over the vectors read
   back from the store) against faiss ``IndexFlatIP`` search on the same arrays, query chunk by
   query chunk (<= 2,048); results are compared with the store's.
3. **ingest** - a 224 px split of PathMNIST's shape (89,996 x 224 x 224 x 3 uint8, 13.5 GB; the file
   also holds small val and test splits) written as a synthetic ``.npz`` in MedMNIST's format
   (uncompressed members, written incrementally in bounded memory), then ingested by the real
   reader (MD5 verified, streamed) and ingest job in a child process with a random-init
   three-layer CNN at 32 px (:class:`Tiny32CNN`); its peak RSS (``VmHWM`` of the child, and the
   process tree sampled with psutil) must stay under 3 GB (10^9 bytes).
4. **study loop** - the published code's way: for each query, for each database row, one Euclidean
   distance in numpy, then a sort; timed on a few queries and compared per query with cbmir.
5. **extract** (``--extract``) - images/s of each registered ImageNet CNN (random-init weights: speed
   does not depend on them) at 32 and 224 px on this machine's device, in inference mode.

The run ends with one line per target: ``<name> ratio=<x.xx> target=<y.yy> PASS|FAIL`` and
``ingest_rss_gb value=<x.xx> target=3.00 PASS|FAIL``. ``--quick`` runs scaled-down sizes (same code
paths) in under two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib import format as npy_format

GB = 1e9
#: Targets of issue 6 (DESIGN.md §5): ratio ours / reference, or an absolute value.
TARGETS = {"search_store_vs_raw_edge": 1.15, "blas_vs_faiss": 1.30, "ingest_rss_gb": 3.00}

#: PathMNIST (medmnist.INFO): 89,996 / 10,004 / 7,180 images, 9 classes, RGB.
FULL = dict(n_db=89_996, n_q=7_180, dim=1_024, n_train=89_996, n_val=64, n_test=64,
            image_size=224, loop_queries=8, reps=2)
QUICK = dict(n_db=20_000, n_q=1_000, dim=1_024, n_train=1_000, n_val=16, n_test=16,
             image_size=224, loop_queries=3, reps=2)


# ----------------------------------------------------------------------------- helpers
@dataclass
class Timing:
    """Wall-clock and process CPU seconds of repeated runs of one measured function."""

    wall: list = field(default_factory=list)
    cpu: list = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return float(np.mean(self.wall)) if self.wall else float("nan")

    @property
    def cpu_s(self) -> float:
        return float(np.mean(self.cpu)) if self.cpu else float("nan")

    def text(self) -> str:
        runs = ", ".join(f"{w:.2f}" for w in self.wall)
        return f"wall {self.wall_s:8.2f} s (runs: {runs})  cpu {self.cpu_s:8.2f} s"


def _timed(fn: Callable, t: Timing):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    t.wall.append(time.perf_counter() - w)
    t.cpu.append(time.process_time() - c)
    return out


def machine_facts() -> dict:
    """CPU model, CPUs usable, memory, BLAS, library versions, date and load (facts for the report)."""
    import importlib.metadata as md

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        ncpu = os.cpu_count()
    facts = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu, "cpus": ncpu,
             "python": platform.python_version(), "load_avg": os.getloadavg()}
    try:
        import psutil

        facts["ram_gb"] = round(psutil.virtual_memory().total / GB, 1)
    except ImportError:  # pragma: no cover
        pass
    for pkg in ("numpy", "faiss-cpu", "qdrant-edge-py", "torch", "timm"):
        try:
            facts[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        from threadpoolctl import threadpool_info

        facts["blas"] = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} "
                         f"threads={i.get('num_threads')}" for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:  # pragma: no cover
        pass
    return facts


def _say(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- 1. search
def build_synthetic_collection(store, name: str, n_db: int, n_q: int, dim: int, *, n_classes: int = 9,
                               seed: int = 0, chunk: int = 2048) -> None:
    """Upsert ``n_db`` train and ``n_q`` test float32 vectors (clustered Gaussians, ``n_classes``
    labels) into a new cosine collection ``name`` of ``store`` (recreated if present)."""
    from cbmir.search.schema import CollectionMeta, make_payload

    meta = CollectionMeta(dataset="pathmnist", size=224, model="synthetic", backend="numpy", dim=dim,
                          weights="none", preprocessing="synthetic clustered Gaussian vectors (bench)")
    store.ensure_collection(name, meta, recreate=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32)
    for split, n in (("train", n_db), ("test", n_q)):
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            labels = rng.integers(0, n_classes, b - a)
            x = centres[labels] * 0.12 + rng.standard_normal((b - a, dim), dtype=np.float32)
            pays = [make_payload(dataset="pathmnist", split=split, index=i, label=int(lab), model="synthetic",
                                 size=224, image_id=f"synthetic/{split}/{i}") for i, lab in zip(range(a, b), labels)]
            store.upsert(name, split, list(range(a, b)), x, pays)
    flush = getattr(store, "flush", None)
    if flush:
        flush(name)


def raw_edge_queries(store, name: str, queries: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """The engine alone: ``query_batch`` over all queries (exact, split filter), ids ``(Q, k)``."""
    import qdrant_edge as qe

    sh = store._shard(name)  # noqa: SLF001 - the benchmark measures the engine underneath the store
    vname = store.meta(name).layout[0][0]
    flt = qe.Filter(must=[qe.FieldCondition(key="split", match=qe.MatchValue("train"))])
    params = qe.SearchParams(exact=True)
    out = []
    for a in range(0, len(queries), batch_size):
        reqs = [qe.QueryRequest(limit=k, query=qe.Query.Nearest(row, using=vname), filter=flt, params=params,
                                with_payload=False, with_vector=False) for row in queries[a:a + batch_size]]
        out.extend([[int(p.id) for p in r] for r in sh.query_batch(qe.QueryBatchRequest(reqs))])
    return np.asarray(out, dtype=np.int64)


class RawAlongside:
    """Stand-in for an :class:`cbmir.search.edge_store.EdgeStore` given to ``evaluate_collection``: every
    batched ``search`` is paired with the raw engine's ``query_batch`` on the same query vectors, run
    right before it (``raw_first``) or right after it, alternating batch by batch, and timed apart
    (``raw_wall`` / ``raw_cpu`` seconds, ``raw_ids`` per batch). Pairing at batch level keeps the two
    measurements seconds apart, so load from other processes hits both alike. Everything else is
    forwarded to the store."""

    def __init__(self, store, *, raw_first: bool = True) -> None:
        self._store = store
        self._raw_first = raw_first
        self.raw_wall = 0.0
        self.raw_cpu = 0.0
        self.raw_ids: list[np.ndarray] = []

    def __getattr__(self, attr):
        return getattr(self._store, attr)

    def _raw(self, name, queries, k) -> None:
        c, w = time.process_time(), time.perf_counter()
        ids = raw_edge_queries(self._store, name, queries, k, len(queries))
        self.raw_wall += time.perf_counter() - w
        self.raw_cpu += time.process_time() - c
        self.raw_ids.append(ids)

    def search(self, name, queries, k, **kw):
        q = np.atleast_2d(queries)
        first = self._raw_first
        self._raw_first = not first
        if first:
            self._raw(name, q, k)
        res = self._store.search(name, queries, k, **kw)
        if not first:
            self._raw(name, q, k)
        return res


def study_loop(queries: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    """The published code's search: per query, per database row, one Euclidean distance, then sort."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for i, q in enumerate(queries):
        dists = []
        for j in range(len(database)):
            dists.append(np.linalg.norm(q - database[j]))
        out[i] = np.argsort(np.asarray(dists), kind="stable")[:k]
    return out


def bench_search(cfg: dict, work: Path, results: dict, *, k: int = 5, batch_size: int = 256) -> None:
    """Sections 1 (store vs raw Edge), 2 (BLAS vs faiss) and 4 (study loop), on one synthetic
    collection in ``work / "store"`` (removed at the end); figures go to ``results``."""
    from cbmir.search.edge_store import EdgeStore

    n_db, n_q, dim = cfg["n_db"], cfg["n_q"], cfg["dim"]
    _say(f"\n== 1. search: {n_q:,} queries x {n_db:,} database x {dim:,} dims, float32, k={k}, "
         f"batch {batch_size} ==")
    store = EdgeStore(work / "store")
    name = "bench_synthetic"
    try:
        t0 = time.perf_counter()
        build_synthetic_collection(store, name, n_db, n_q, dim)
        _say(f"built the collection in {time.perf_counter() - t0:.1f} s (upserts through the store)")
        _, q_vec, _ = store.fetch(name, "test")
        ev, t_ours = _search_store_vs_raw(store, name, cfg, results, k=k, batch_size=batch_size)
        x, res_idx, t_blas = _search_blas_vs_faiss(store, name, q_vec, ev, t_ours, cfg, results, k=k)
        _search_study_loop(q_vec, x, res_idx, t_ours, t_blas, cfg, results, k=k)
    finally:
        store.close()
        shutil.rmtree(work / "store", ignore_errors=True)


def _search_store_vs_raw(store, name: str, cfg: dict, results: dict, *, k: int, batch_size: int) -> tuple:
    """Section 1: ``evaluate_collection`` end to end beside the raw engine's batched exact queries
    (:class:`RawAlongside`), ``cfg["reps"]`` times. Returns ``(last evaluation, cbmir's Timing)``."""
    from cbmir.evaluation.evaluate import evaluate_collection

    n_q = cfg["n_q"]
    t_ours, t_ref = Timing(), Timing()
    for rep in range(cfg["reps"]):  # each batch: raw engine and store back to back, alternating which goes first
        proxy = RawAlongside(store, raw_first=rep % 2 == 0)
        c, w = time.process_time(), time.perf_counter()
        ev = evaluate_collection(proxy, name, k=k, batch_size=batch_size, latency_sample=0, progress=False)
        w, c = time.perf_counter() - w, time.process_time() - c
        t_ours.wall.append(w - proxy.raw_wall)
        t_ours.cpu.append(c - proxy.raw_cpu)
        t_ref.wall.append(proxy.raw_wall)
        t_ref.cpu.append(proxy.raw_cpu)
    raw_ids = np.concatenate(proxy.raw_ids)
    same = float((ev.topk_indices == (raw_ids & ((1 << 40) - 1))).all(axis=1).mean())
    ratio = t_ours.wall_s / t_ref.wall_s
    _say("evaluate_collection ran with the raw engine's query_batch on the same batch right before or after "
         "each of its batched searches (alternating); the raw calls are timed apart and subtracted")
    _say(f"cbmir evaluate_collection (end to end): {t_ours.text()}")
    own_search = ev.timings["search_s"] - proxy.raw_wall  # evaluate's search loop minus the raw calls
    _say(f"   last run: fetch {ev.timings['fetch_s']:.2f} s, search {own_search:.2f} s "
         f"({own_search / n_q * 1e3:.2f} ms/query), metrics: "
         + ", ".join(f"{m} {100 * v:.2f}" for m, v in ev.metrics.items()))
    _say(f"raw Edge query_batch (exact, filter):   {t_ref.text()}")
    _say(f"ratio {ratio:.3f} (cpu ratio {t_ours.cpu_s / t_ref.cpu_s:.3f}); same top-k as raw Edge for "
         f"{100 * same:.2f}% of queries (raw Edge breaks score ties arbitrarily)")
    results["search"] = {"ours_wall_s": t_ours.wall, "ours_cpu_s": t_ours.cpu, "raw_wall_s": t_ref.wall,
                         "raw_cpu_s": t_ref.cpu, "ratio": ratio, "fetch_s": ev.timings["fetch_s"],
                         "search_s": own_search, "same_topk_as_raw": same}
    return ev, t_ours


def _search_blas_vs_faiss(store, name: str, q_vec: np.ndarray, ev, t_ours: Timing, cfg: dict, results: dict, *,
                          k: int) -> tuple:
    """Section 2: ``--search-backend blas`` against faiss ``IndexFlatIP`` on the vectors read back,
    query chunk by query chunk (<= 2,048), alternating which side goes first.

    Returns:
        ``(database vectors float32 (N, dim), blas top-k rows int64 (Q, k), blas Timing)``.
    """
    import faiss

    from cbmir.search.blas import BlasIndex

    n_q = cfg["n_q"]
    _say("\n== 2. blas: --search-backend blas vs faiss IndexFlatIP, same vectors ==")
    t0 = time.perf_counter()
    index = BlasIndex.from_store(store, name, "train")
    _say(f"read {len(index.indices):,} database vectors back from the store in {time.perf_counter() - t0:.1f} s")
    x = index.vectors
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)  # a copy of the vectors, like BlasIndex's (not timed on either side)
    chunks = np.array_split(np.arange(n_q), max(1, -(-n_q // 2048)))
    t_blas, t_faiss = Timing(), Timing()
    for rep in range(cfg["reps"]):  # query chunks of <= 2,048, alternating which side goes first
        parts_b, parts_f = [], []
        for ci, rows in enumerate(chunks):
            qc = q_vec[rows]
            for side in (("blas", "faiss") if (ci + rep) % 2 == 0 else ("faiss", "blas")):
                if side == "blas":
                    parts_b.append(_timed_in(lambda: index.search(qc, k).indices, t_blas, first=ci == 0))
                else:
                    parts_f.append(_timed_in(lambda: flat.search(qc, k)[1], t_faiss, first=ci == 0))
    res_idx, fi = np.concatenate(parts_b), np.concatenate(parts_f)
    ratio_b = t_blas.wall_s / t_faiss.wall_s
    eq_store = bool(np.array_equal(res_idx, ev.topk_indices))
    eq_faiss = float((res_idx == fi).all(axis=1).mean())
    _say(f"cbmir blas exact_topk:  {t_blas.text()}")
    _say(f"faiss IndexFlatIP:      {t_faiss.text()}")
    _say(f"ratio {ratio_b:.3f} (cpu ratio {t_blas.cpu_s / t_faiss.cpu_s:.3f}); identical to the store's "
         f"results: {eq_store}; same top-k as faiss for {100 * eq_faiss:.2f}% of queries")
    _say(f"store end to end vs blas search: {t_ours.wall_s / t_blas.wall_s:.2f}x (DESIGN.md §5 asks 1.5x; "
         "information)")
    results["blas"] = {"blas_wall_s": t_blas.wall, "blas_cpu_s": t_blas.cpu, "faiss_wall_s": t_faiss.wall,
                       "faiss_cpu_s": t_faiss.cpu, "ratio": ratio_b, "identical_to_store": eq_store,
                       "same_as_faiss": eq_faiss, "store_vs_blas": t_ours.wall_s / t_blas.wall_s}
    return x, res_idx, t_blas


def _timed_in(fn: Callable, t: Timing, *, first: bool):
    """``fn()``, its wall and CPU seconds added to the current run of ``t`` (a new run when ``first``)."""
    if first:
        t.wall.append(0.0)
        t.cpu.append(0.0)
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    t.wall[-1] += time.perf_counter() - w
    t.cpu[-1] += time.process_time() - c
    return out


def _search_study_loop(q_vec: np.ndarray, x: np.ndarray, res_idx: np.ndarray, t_ours: Timing, t_blas: Timing,
                       cfg: dict, results: dict, *, k: int) -> None:
    """Section 4: the published code's per-row loop on ``cfg["loop_queries"]`` queries, extrapolated
    to all queries and compared per query with cbmir's store and blas timings."""
    n_q, nl = cfg["n_q"], cfg["loop_queries"]
    _say(f"\n== 4. the study's loop: per query, per database row, np.linalg.norm; {nl} queries ==")
    t = Timing()
    loop_ids = _timed(lambda: study_loop(q_vec[:nl], x, k), t)
    per_q_loop = t.wall_s / nl
    per_q_store = t_ours.wall_s / n_q
    per_q_blas = t_blas.wall_s / n_q
    _say(f"study loop: {per_q_loop * 1e3:.1f} ms/query -> {per_q_loop * n_q / 60:.1f} min for all {n_q:,} "
         f"queries (extrapolated)")
    _say(f"cbmir: {per_q_store * 1e3:.2f} ms/query through the store ({per_q_loop / per_q_store:.0f}x faster), "
         f"{per_q_blas * 1e3:.3f} ms/query with --search-backend blas ({per_q_loop / per_q_blas:.0f}x faster)")
    _say(f"(the loop ranks by Euclidean distance on these unit vectors, the same order as cosine: top-k "
         f"equal for {100 * float((loop_ids == res_idx[:nl]).all(axis=1).mean()):.0f}% of its queries)")
    results["study_loop"] = {"ms_per_query": per_q_loop * 1e3, "speedup_store": per_q_loop / per_q_store,
                             "speedup_blas": per_q_loop / per_q_blas}


# ----------------------------------------------------------------------------- 3. ingest
def write_synthetic_medmnist_npz(path: Path, n: dict, image_shape: tuple, *, n_classes: int = 9, seed: int = 0,
                                 chunk_rows: int = 256, compress: bool = False) -> int:
    """Write an ``.npz`` in MedMNIST's layout (``{split}_images`` uint8 ``(N, *image_shape)``,
    ``{split}_labels`` uint8 ``(N, 1)``) incrementally: memory is one chunk of ``chunk_rows`` images.

    Members are stored uncompressed like ``np.savez`` (``compress=True``: deflated, level 1, like the
    official ``savez_compressed`` files). Pixels are a fixed random chunk shifted per chunk
    (different images, cheap to make). Returns the file size in bytes.
    """
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (chunk_rows, *image_shape), dtype=np.uint8)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    tmp = path.with_suffix(".part")
    with zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True, compresslevel=1 if compress else None) as zf:
        for split in ("train", "val", "test"):
            m = int(n[split])
            with zf.open(f"{split}_images.npy", "w", force_zip64=True) as fh:
                npy_format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False,
                                                       "shape": (m, *image_shape)})
                for a in range(0, m, chunk_rows):
                    rows = min(chunk_rows, m - a)
                    fh.write(np.add(base[:rows], np.uint8((a // chunk_rows) % 251)).data)
            labels = rng.integers(0, n_classes, (m, 1), dtype=np.uint8)
            with zf.open(f"{split}_labels.npy", "w", force_zip64=True) as fh:
                npy_format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (m, 1)})
                fh.write(labels.data)
    os.replace(tmp, path)
    return path.stat().st_size


class Tiny32CNN:
    """Cheap benchmark extractor: a random-init CNN on images resized to 32 px (128 dims).

    Three stride-2 3x3 convolutions (3 -> 32 -> 64 -> 128 channels, ReLU) and global average
    pooling, seeded; about 2.6 MFLOPs per image, so that section 3 measures the reader, the
    preprocessing, the job and the store rather than a large model.
    ``extract(uint8 (B, H, W, 3)) -> float32 (B, 128)`` (to 32 x 32: nearest-neighbour subsampling
    when the side is a multiple of 32, e.g. every 7th pixel at 224 px, else bicubic; ImageNet
    mean/std; inference mode); an :class:`cbmir.ingest.base.Extractor` for the ingest job.
    """

    def __init__(self, batch_size: int = 256) -> None:
        import torch
        from torch import nn

        from cbmir.ingest.base import ExtractorSpec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = nn.Sequential(
                nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        self.batch_size = batch_size
        self.spec = ExtractorSpec(name="bench_tinycnn_32px", family="benchmark", dim=128,
                                  input_policy="resize to 32 px", weights_source="random-init")

    def extract(self, images: np.ndarray) -> np.ndarray:
        import torch

        from cbmir.ingest.transforms import normalize, resize_batch

        out = np.empty((len(images), 128), dtype=np.float32)
        with torch.inference_mode():
            for a in range(0, len(images), self.batch_size):
                chunk = images[a:a + self.batch_size]
                h = chunk.shape[1]
                if h % 32 == 0:  # 224 px: every 7th pixel (nearest-neighbour), no full-size float copy
                    st = h // 32
                    x = torch.from_numpy(np.ascontiguousarray(chunk[:, st // 2::st, st // 2::st, :])).float() / 255.0
                else:
                    x = torch.from_numpy(np.array(chunk, copy=True)).float()
                    x = resize_batch(x, 32, "bicubic").clamp_(0, 255) / 255.0
                x = normalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).permute(0, 3, 1, 2).contiguous()
                out[a:a + len(x)] = self.model(x).numpy()
        return out

    def identity(self) -> dict:
        return {"model": self.spec.name, "backend": "torch", "weights": "random-init", "random_init": True,
                "preprocessing": "to 32 px (nearest / bicubic); ImageNet mean/std; 3 conv layers + average pooling"}


def _ingest_child(args: dict) -> None:
    """Child process of section 3: verify (streamed MD5), stream and ingest the synthetic train split.

    The synthetic file is not an official one, so ``medmnist.INFO``'s split sizes and MD5 for
    (pathmnist, 224) are replaced, in this process only, by the synthetic file's.
    """
    import torch

    torch.set_num_threads(max(1, int(args.get("threads") or torch.get_num_threads())))
    from medmnist import INFO

    from cbmir.ingest.embedder import ImageEmbedder
    from cbmir.ingest.job import ingest
    from cbmir.ingest.medmnist_data import file_md5, open_medmnist
    from cbmir.search.edge_store import EdgeStore

    def peak() -> float:
        """Peak RSS of this process so far, GB: ``VmHWM`` of /proc/self/status (Linux). Not ``ru_maxrss``:
        that one survives ``execve`` and so includes the RSS of the parent a vfork()ed child started from."""
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GB
        except OSError:  # pragma: no cover - not Linux
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # pragma: no cover

    phases = {"imports": peak()}
    data_dir = Path(args["data_dir"])
    path = data_dir / "pathmnist_224.npz"
    t0 = time.perf_counter()
    md5 = file_md5(path)  # streamed, 1 MiB at a time
    md5_s = time.perf_counter() - t0
    phases["md5"] = peak()
    INFO["pathmnist"]["MD5_224"] = md5
    INFO["pathmnist"]["n_samples"] = dict(args["n"])
    src = open_medmnist("pathmnist", 224, data_dir, verify=True)
    emb = ImageEmbedder(Tiny32CNN(), 224)
    store = EdgeStore(args["store"])
    phases["open"] = peak()
    try:
        t0 = time.perf_counter()
        rep = ingest(src, emb, store, splits=("train",), batch_size=int(args["batch_size"]), progress=False)
        dt = time.perf_counter() - t0
        phases["ingest"] = peak()
        count = store.count(rep.collection, "train")
    finally:
        store.close()
    phases["close"] = peak()
    print("BENCH_JSON " + json.dumps({"images": rep.written["train"], "stored": count, "seconds": dt,
                                      "images_per_s": rep.written["train"] / dt, "md5_s": md5_s,
                                      "peak_rss_bytes": phases["close"] * GB, "peak_gb_after": phases}),
          flush=True)


def bench_ingest(cfg: dict, work: Path, results: dict, *, batch_size: int = 256) -> None:
    """Section 3: synthetic 224 px PathMNIST-shaped npz, ingested in a child process; peak RSS."""
    import psutil

    n = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"]}
    s = cfg["image_size"]
    shape = (s, s, 3)
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "pathmnist_224.npz"
    _say(f"\n== 3. ingest: {n['train']:,} x {s} x {s} x 3 uint8 train split "
         f"({n['train'] * s * s * 3 / GB:.1f} GB; file with val/test "
         f"{sum(n.values()) * s * s * 3 / GB:.1f} GB), batch {batch_size} ==")
    t0 = time.perf_counter()
    size = write_synthetic_medmnist_npz(path, n, shape)
    dt = time.perf_counter() - t0
    _say(f"wrote {path.name}: {size / GB:.2f} GB in {dt:.1f} s ({size / GB / dt:.2f} GB/s), bounded memory")
    args = {"data_dir": str(data_dir), "store": str(work / "ingest_store"), "n": n, "batch_size": batch_size}
    cmd = [sys.executable, "-m", "cbmir.benchmarks.bench", "--ingest-child", json.dumps(args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak_tree = [0]
    stop = threading.Event()

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    tree = [p, *p.children(recursive=True)]
                    peak_tree[0] = max(peak_tree[0], sum(c.memory_info().rss for c in tree))
                except psutil.Error:
                    pass
                stop.wait(0.1)
        except psutil.Error:
            pass

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    line = next((x for x in out.splitlines() if x.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        _say(out[-4000:])
        raise RuntimeError(f"ingest child failed with exit code {proc.returncode}")
    rep = json.loads(line[len("BENCH_JSON "):])
    peak = max(rep["peak_rss_bytes"], peak_tree[0])
    _say(f"ingest (child process, streamed MD5 {rep['md5_s']:.1f} s, then read + resize + tiny CNN at 32 px + "
         f"Edge upserts): {rep['images']:,} images in {rep['seconds']:.1f} s = {rep['images_per_s']:.0f} images/s; "
         f"{rep['stored']:,} points stored; child wall {wall:.1f} s")
    _say(f"peak RSS: {rep['peak_rss_bytes'] / GB:.2f} GB (child VmHWM), {peak_tree[0] / GB:.2f} GB "
         f"(process tree, sampled every 0.1 s); the split alone is {n['train'] * s * s * 3 / GB:.1f} GB")
    _say("   child peak so far after each phase (GB): "
         + ", ".join(f"{k} {v:.2f}" for k, v in rep["peak_gb_after"].items()))
    results["ingest"] = {**rep, "peak_rss_gb": peak / GB, "tree_peak_gb": peak_tree[0] / GB,
                         "file_gb": size / GB, "write_s": dt}
    path.unlink(missing_ok=True)
    shutil.rmtree(work / "ingest_store", ignore_errors=True)


# ----------------------------------------------------------------------------- 5. extraction
def bench_extract(quick: bool, results: dict, *, device: str = "auto") -> None:
    """Section 5: images/s of each registered ImageNet CNN at 32 and 224 px (random-init weights)."""
    from cbmir.ingest.extractors import create_extractor, list_specs

    names = [s.name for s in list_specs("imagenet-cnn")]
    _say(f"\n== 5. extraction throughput (random-init weights, inference mode, device {device}) ==")
    rng = np.random.default_rng(0)
    results["extract"] = {}
    for size in (32, 224):
        n = (8 if quick else 16) if size == 224 else (32 if quick else 128)
        imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        for name in names:
            ext = create_extractor(name, random_init=True, device=device, batch_size=min(n, 64))
            ext.extract(imgs[:min(n, 64)])  # warm-up at the timed batch shape (oneDNN primitives, caches)
            t0 = time.perf_counter()
            ext.extract(imgs)
            ips = n / (time.perf_counter() - t0)
            _say(f"{name:>16} @ {size:>3} px: {ips:8.1f} images/s")
            results["extract"][f"{name}@{size}"] = ips
            del ext


# ----------------------------------------------------------------------------- driver
def run_bench(*, quick: bool = False, work_dir: str | os.PathLike | None = None, sections=None,
              extract: bool = False, json_out: str | os.PathLike | None = None, keep: bool = False) -> dict:
    """Run the benchmark sections and print every figure, then one line per target.

    Args:
        quick: scaled-down sizes (:data:`QUICK`) instead of the study's (:data:`FULL`).
        work_dir: folder for the synthetic store and npz (default: the system temp folder); the full
            run needs about 17 GB free there.
        sections: subset of ``{"search", "ingest"}`` (default both; ``search`` includes blas and the
            study loop).
        extract: also run the extraction-throughput section.
        json_out: write all figures as JSON here.

    Returns:
        dict of figures (also written to ``json_out``), with ``targets``: name -> (value, target, passed).
    """
    cfg = QUICK if quick else FULL
    sections = set(sections or ("search", "ingest"))
    base = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cbmir-bench-", dir=base))
    facts = machine_facts()
    results: dict = {"mode": "quick" if quick else "full", "machine": facts, "config": cfg}
    _say(f"cbmir bench ({results['mode']}) {facts['date']}")
    _say("machine: " + "; ".join(f"{k}={v}" for k, v in facts.items() if k != "date"))
    t_all = time.perf_counter()
    try:
        if "search" in sections:
            bench_search(cfg, work, results)
        if "ingest" in sections:
            bench_ingest(cfg, work, results)
        if extract:
            bench_extract(quick, results)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t_all
    results["load_avg_end"] = os.getloadavg()
    targets = {}
    if "search" in results:
        targets["search_store_vs_raw_edge"] = results["search"]["ratio"]
    if "blas" in results:
        targets["blas_vs_faiss"] = results["blas"]["ratio"]
    if "ingest" in results:
        targets["ingest_rss_gb"] = results["ingest"]["peak_rss_gb"]
    results["targets"] = {k: (v, TARGETS[k], bool(v < TARGETS[k])) for k, v in targets.items()}
    if quick:
        _say("\nnote: --quick uses scaled-down sizes; reading points back (per database payload, per query "
             "vector) weighs more there than at the study's scale, where the targets apply")
    _say(f"\n== summary ({results['total_s'] / 60:.1f} min; load average at start {facts['load_avg'][0]:.1f}, "
         f"at end {results['load_avg_end'][0]:.1f} on {facts['cpus']} CPUs) ==")
    if "study_loop" in results:
        sl = results["study_loop"]
        _say(f"study_loop_speedup value={sl['speedup_store']:.0f}x (store) {sl['speedup_blas']:.0f}x (blas) info")
    if "ingest" in results:
        _say(f"ingest_images_per_s value={results['ingest']['images_per_s']:.0f} info")
    for k, (v, tgt, ok) in results["targets"].items():
        kind = "value" if k.endswith("_gb") else "ratio"
        _say(f"{k} {kind}={v:.2f} target={tgt:.2f} {'PASS' if ok else 'FAIL'}")
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2, default=float))
    return results


def main(argv=None) -> None:
    """``python -m cbmir.benchmarks.bench [--quick] ...`` (same as ``cbmir bench``)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work-dir")
    ap.add_argument("--only", help="comma-separated: search, ingest")
    ap.add_argument("--extract", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--ingest-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.ingest_child:
        _ingest_child(json.loads(a.ingest_child))
        return
    run_bench(quick=a.quick, work_dir=a.work_dir, sections=a.only.split(",") if a.only else None,
              extract=a.extract, json_out=a.json, keep=a.keep)


if __name__ == "__main__":
    main()
